"""`toy train`: tiny runs learn, log phases at the right steps, checkpoint, resume exactly, refuse bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models.toy import ToyTransformer
from interplab.toy.configs import ToyTrainConfig
from interplab.toy.loop import checkpoint_dir, saved_checkpoints
from interplab.toy.tasks import make_task
from interplab.toy.toy_run import load_run
from interplab.toy.train import format_summary, jump_step, read_log, run_toy_train

TINY_TASK = "ov-coherent:n_signal=2,n_noise=2,n_ctx=4"    # 3 outputs: C(1,1), C(1,2), C(2,2)


def tiny(out, **overrides) -> ToyTrainConfig:
    settings = dict(task=TINY_TASK, d_model=16, heads=2, d_head=4, steps=200, batch_size=64, lr=0.01, warmup=10,
                    qualify_every=20, thorough_every=20, checkpoint_every=100, eval_examples=512, out=str(out),
                    progress=False)
    return ToyTrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    return out, run_toy_train(tiny(out))


def accuracy(model, task, n=2000, seed=123) -> float:
    batch = task.sample(n, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        predicted = model(batch.tokens)[:, -1].argmax(-1)
    return float((predicted == batch.targets[:, -1]).float().mean())


def test_a_tiny_run_learns_the_task_and_writes_the_run_folder(run):
    out, result = run
    assert {p.name for p in out.iterdir()} >= {"config.json", "log.jsonl", "model", "metrics.json", "checkpoints"}
    assert "train.json" not in {p.name for p in out.iterdir()}
    saved = json.loads((out / "config.json").read_text())
    assert saved["kind"] == "toy train" and "out" not in saved["config"]   # a moved folder is the same run
    config = saved["config"]
    assert config["task"] == TINY_TASK and config["d_mlp"] == 0 and config["heads"] == 2   # defaults filled in
    model = ToyTransformer.load(out / "model")
    assert model.cfg.d_mlp is None and not model.cfg.layer_norm and model.cfg.n_layers == 1
    assert accuracy(model, make_task(TINY_TASK)) == 1.0                  # fresh examples, counted independently
    assert accuracy(ToyTransformer(model.cfg), make_task(TINY_TASK)) < 0.7   # an untrained model does not
    m = result.metrics
    assert m["status"] == "completed" and m["steps_trained"] == 200 and result.out == str(out)
    assert m["final"]["test_acc"] == 1.0 and m["final"]["train_acc"] == 1.0
    saved_metrics = json.loads((out / "metrics.json").read_text())
    assert saved_metrics["kind"] == "toy train" and saved_metrics["final"] == m["final"]
    assert "thorough phase started at step" in format_summary(result)
    loaded = load_run(out)                              # what `toy inspect` reads
    assert loaded.task.spec() == make_task(TINY_TASK).spec() and loaded.metrics["steps_trained"] == 200
    assert [s for s, _ in loaded.checkpoints] == m["checkpoints"] and loaded.log == read_log(out)


def test_the_log_holds_every_eval_and_the_thorough_start_where_the_model_qualified(run):
    out, run_result = run
    result = run_result.metrics
    log = read_log(out)
    quals = [r for r in log if r["event"] == "eval" and r["phase"] == "qualification"]
    assert [r["step"] for r in quals] == list(range(0, 201, 20))
    qualified = next(r["step"] for r in quals if r["metrics"]["train_acc"] >= 0.9)
    start = next(r for r in log if r["event"] == "start" and r["phase"] == "thorough")
    assert start["step"] == qualified == result["phase_starts"]["thorough"]
    thorough = [r["step"] for r in log if r["event"] == "eval" and r["phase"] == "thorough"]
    gate = next(r["step"] for r in log if r["event"] == "gate")
    assert thorough[0] == qualified and thorough[-1] == gate == result["gates_passed"]["thorough"]
    assert not any(r["phase"] == "thorough" and r["step"] < qualified for r in log)
    safety = [r["metrics"] for r in log if r["event"] == "eval" and r["phase"] == "safety"]
    assert all(m["loss_finite"] == 1.0 and 0 < m["weight_norm"] < 1000 for m in safety)
    # Checkpoints: where the thorough phase started and the end (the periodic one at step 100 was superseded).
    assert [s for s, _ in saved_checkpoints(out)] == result["checkpoints"] == [qualified, 200]
    assert result["jump_step"] == qualified


def test_resume_continues_from_the_last_checkpoint_and_matches_an_uninterrupted_run(run, tmp_path):
    out, result = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for gone in (checkpoint_dir(copy, 200), copy / "model", copy / "metrics.json"):  # interrupted before the end
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    start = result.metrics["phase_starts"]["thorough"]
    resumed = run_toy_train(tiny(copy))
    assert resumed.resumed_from == start and resumed.metrics["steps_trained"] == 200
    a, b = ToyTransformer.load(out / "model").state_dict(), ToyTransformer.load(copy / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert read_log(copy) == read_log(out)          # what the interrupted run logged after step 60 was replaced
    assert resumed.metrics["loss_curve"] == result.metrics["loss_curve"]
    again = run_toy_train(tiny(copy))               # complete: nothing to do
    assert again.resumed_from == 200 and again.metrics == resumed.metrics


def test_a_different_config_in_the_same_folder_is_an_error(run):
    out, _ = run
    with pytest.raises(InterplabError, match=r"holds a different toy train run \(differs in: config\.lr 0\.01 → 0\.02\)"):
        run_toy_train(tiny(out, lr=0.02))
    with pytest.raises(InterplabError, match="already holds a run; pass --resume"):
        run_toy_train(tiny(out, resume=False))


def test_modular_addition_keeps_a_checkpoint_where_it_memorised_and_stops_after_the_gate(tmp_path):
    out = tmp_path / "mod"
    cfg = ToyTrainConfig(task="modular-addition:p=11,train_fraction=0.5", d_model=32, heads=2, d_head=8, d_mlp=64,
                         steps=200, lr=1e-2, weight_decay=0.1, init_std=0.1, warmup=10, qualify_every=10,
                         thorough_every=10, stop_after=20, gate="thorough.test_loss < 100", out=str(out),
                         progress=False)
    result = run_toy_train(cfg).metrics
    start = result["phase_starts"]["thorough"]
    log = read_log(out)
    first_memorised = next(r["step"] for r in log if r["phase"] == "qualification" and r["event"] == "eval"
                           and r["metrics"]["train_acc"] >= 0.99)
    assert start == first_memorised == result["gates_passed"]["thorough"]   # this gate holds at once
    assert result["status"] == "stopped early" and result["steps_trained"] == start + 20
    assert result["checkpoints"] == [start, start + 20]
    memorised = ToyTransformer.load(checkpoint_dir(out, start))
    task = make_task(cfg.task)
    train = task.train_batch()
    with torch.no_grad():
        acc = (memorised(train.tokens)[:, -1].argmax(-1) == train.targets[:, -1]).float().mean()
    assert acc >= 0.99 and len(train.tokens) == 60                          # round(0.5 · 121) = 60 pairs


def test_unset_fields_take_the_task_defaults():
    grok = ToyTrainConfig(task="modular-addition").resolved()
    assert (grok.weight_decay, grok.thorough_when) == (1.0, "qualification.train_acc >= 0.99")
    assert grok.d_mlp > 0 and grok.stop_after >= 0
    ov = ToyTrainConfig(task="ov-coherent", heads=1, d_head=3).resolved()
    assert (ov.heads, ov.d_head, ov.d_mlp, ov.stop_after) == (1, 3, 0, -1)


def test_jump_step_is_the_first_logged_test_accuracy_at_or_over_one_half():
    log = [{"step": 0, "event": "start", "phase": "qualification"},
           {"step": 50, "event": "eval", "phase": "thorough", "metrics": {"test_acc": 0.1}},
           {"step": 100, "event": "eval", "phase": "thorough", "metrics": {"test_acc": 0.5}},
           {"step": 150, "event": "eval", "phase": "thorough", "metrics": {"test_acc": 0.9}}]
    assert jump_step(log) == 100 and jump_step(log, threshold=0.95) is None


@pytest.mark.parametrize("overrides, message", [
    ({"heads": 0}, "--heads must be >= 1"),
    ({"lr": -1.0}, "--lr must be > 0"),
    ({"task": "ov-coherent:n_signal=0"}, "n_signal >= 1"),
    ({"thorough_when": "train_acc > 0.9"}, "is not PHASE.METRIC OP NUMBER"),
    ({"thorough_when": "qualification.test_acc > 0.9"}, "no metric 'test_acc'; its metrics: train_acc, train_loss"),
    ({"gate": "final.test_acc > 0.9"}, "unknown phase 'final'; phases: qualification, safety, thorough"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(InterplabError, match=message):
        run_toy_train(tiny(tmp_path / "r", **overrides))


@pytest.mark.slow
def test_modular_addition_groks_memorising_first_and_generalising_later(tmp_path):
    """The default grokking run, cut at 1500 steps (~50 s): memorised with test accuracy < 0.5 when the thorough
    phase starts, and test accuracy crossing 0.5 hundreds of steps later."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model: one thread is fastest, and far faster on a busy machine
    try:
        result = run_toy_train(ToyTrainConfig(task="modular-addition", steps=1500, out=str(tmp_path / "grok"),
                                              progress=False)).metrics
    finally:
        torch.set_num_threads(threads)
    start, jump = result["phase_starts"]["thorough"], result["jump_step"]
    log = read_log(tmp_path / "grok")
    at_start = next(r["metrics"]["test_acc"] for r in log if r["event"] == "eval" and r["phase"] == "thorough")
    assert start is not None and start <= 500 and at_start < 0.5
    assert jump is not None and jump >= start + 300
    assert result["final"]["train_acc"] > 0.99 and result["final"]["test_acc"] > 0.8
    assert start in result["checkpoints"]


def test_a_task_file_that_is_not_python_is_refused_before_anything_is_written(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not python\n")
    with pytest.raises(InterplabError, match="is not a Python file"):
        run_toy_train(tiny(tmp_path / "r", task=f"python:{notes}:f"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
