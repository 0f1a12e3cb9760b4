"""`beliefs train`: tiny runs on Mess3 lower the loss toward h(L+1), checkpoint on the planned grid, and resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from interplab.beliefs import make_process, myopic_entropy
from interplab.beliefs.configs import BeliefTrainConfig
from interplab.beliefs.train import checkpoint_tokens, format_summary, learning_rate, saved_checkpoints, train_beliefs
from interplab.errors import InterplabError
from interplab.models.toy import ToyTransformer
from interplab.toy.loop import checkpoint_dir


def tiny(out, **overrides) -> BeliefTrainConfig:
    # 32 sequences × ctx 4 = 128 tokens per step; 60 steps.
    settings = dict(process="mess3", layers=1, d_model=16, heads=1, ctx=4, tokens=7680, batch_size=32, lr=1e-2,
                    checkpoints=[500, 2000], eval_sequences=100, log_every=10, out=str(out), progress=False)
    return BeliefTrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("beliefs") / "run"
    return out, train_beliefs(tiny(out))


def test_checkpoint_grid_rounds_up_to_whole_steps_and_includes_the_papers_counts():
    cfg = BeliefTrainConfig(tokens=3_200_000, batch_size=64, ctx=10)       # 640 tokens per step
    plan = checkpoint_tokens(cfg)
    assert plan[:4] == [10_240, 20_480, 32_000, 64_000]                    # 10k → 16 steps; 20k → 32 steps
    assert {64_000, 640_000, 3_200_000} <= set(plan) and plan[-1] == 3_200_000
    assert all(t % 640 == 0 for t in plan)
    # 500 → 4 steps of 128, 2000 → 16 steps, and the total 60 steps.
    assert checkpoint_tokens(tiny("x")) == [512, 2048, 7680]


def test_schedule_warms_up_then_decays_to_the_final_fraction():
    cfg = BeliefTrainConfig(tokens=640_000, batch_size=64, ctx=10, lr=1e-3, warmup=0.1, lr_final=0.1)  # 1000 steps
    assert learning_rate(cfg, 0) == pytest.approx(1e-5)
    assert learning_rate(cfg, 99) == pytest.approx(1e-3)
    assert learning_rate(cfg, 1000) == pytest.approx(1e-4)
    assert learning_rate(cfg, 550) == pytest.approx(1e-4 + 0.9e-3 / 2)


def test_tiny_run_checkpoints_and_approaches_the_optimum(run):
    out, result = run
    m = result.metrics
    assert [t for t, _ in saved_checkpoints(out)] == [512, 2048, 7680] == [c["tokens"] for c in m["checkpoints"]]
    for step in (4, 16, 60):                         # 128 tokens per step
        files = {p.name for p in checkpoint_dir(out, step).iterdir()}
        assert {"config.json", "model.safetensors", "optimizer.pt", "progress.json"} <= files
    assert saved_checkpoints(out)[0][1] == out / "checkpoints" / "step-4"
    expected = myopic_entropy(make_process("mess3"), 5, base=math.e)[1:]
    assert m["optimum"] == pytest.approx(expected.tolist())
    saved = json.loads((out / "config.json").read_text())
    assert saved["kind"] == "beliefs train" and saved["config"]["ctx"] == 4 and "out" not in saved["config"]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["kind"] == "beliefs train" and summary["final"]["tokens"] == 7680 == m["tokens"]
    assert not (out / "train.json").exists()
    gaps = [c["mean_gap"] for c in summary["checkpoints"]]
    assert all(g >= 0 for g in gaps) and gaps[-1] < gaps[0] and gaps[-1] < 0.02
    # Exact evaluation (4^... here 3^4 = 81 sequences ≤ 100): loss = h(L+1) + KL gap at every position.
    final = m["final"]
    assert final["loss"] == pytest.approx([h + g for h, g in zip(m["optimum"], final["gap"])], abs=1e-9)
    assert summary["loss_curve"][0]["loss"] > summary["loss_curve"][-1]["loss"]
    assert [p["tokens"] for p in summary["loss_curve"]] == [1280 * k for k in range(1, 7)]  # every 10 steps
    ToyTransformer.load(out / "model")
    assert "trained 7,680 tokens" in format_summary(result)


def test_resume_continues_from_the_last_checkpoint_and_matches_an_uninterrupted_run(run, tmp_path):
    out, result = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(checkpoint_dir(copy, 60))          # as if interrupted after the 2048-token checkpoint (step 16)
    shutil.rmtree(copy / "model")
    (copy / "metrics.json").unlink()
    resumed = train_beliefs(tiny(copy))
    assert resumed.resumed_from == 16 and resumed.metrics["tokens"] == 7680
    assert "resumed at 2,048 tokens" in format_summary(resumed)
    a, b = ToyTransformer.load(out / "model").state_dict(), ToyTransformer.load(copy / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The loss curve, whose window spans the checkpoint at step 16, comes out the same too.
    assert resumed.metrics["loss_curve"] == pytest.approx(result.metrics["loss_curve"])
    again = train_beliefs(tiny(copy))                 # complete: nothing to do
    assert again.resumed_from == 60 and again.metrics == resumed.metrics


def test_a_different_config_in_the_same_folder_is_an_error(run):
    out, _ = run
    with pytest.raises(InterplabError, match=r"holds a different beliefs train run \(differs in: config\.lr 0\.01 → 0\.02\)"):
        train_beliefs(tiny(out, lr=0.02))
    with pytest.raises(InterplabError, match="already holds a run; pass --resume"):
        train_beliefs(tiny(out, resume=False))


@pytest.mark.parametrize("overrides, message", [
    ({"tokens": 10}, "less than one step"),
    ({"d_model": 10, "heads": 3}, "not divisible by --heads"),
    ({"process": "mess4"}, "unknown process 'mess4'"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(InterplabError, match=message):
        train_beliefs(tiny(tmp_path / "r", **overrides))
