"""`interplab toy inspect`: the read-outs recover circuits planted by hand, agree with dense computations from the raw
module parameters and with the model's own attention, and refuse models they cannot read."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.toy import readouts as readouts_module
from interplab.toy.configs import InspectToyConfig
from interplab.toy.fourier import fourier_power, jump_step, top_fraction
from interplab.toy.readouts import (
    ablate_heads,
    attention_by_group,
    eqke,
    evou,
    format_summary,
    group_accuracy,
    pair_preference,
    pattern,
    readouts,
    run_toy_inspect,
)
from interplab.toy.tasks import ModularAdditionTask, OVCoherentTask, make_task
from interplab.toy.toy_run import load_run
from interplab.runs import run_settings

BETA = 30.0
"""Key weight of the planted head: the read-off's score for a signal token is BETA / √5 ≈ 13.4 above noise."""


def planted_ov_model() -> tuple[ToyTransformer, OVCoherentTask]:
    """A hand-built solution of ov-coherent with two heads (no LayerNorm, no positions).

    W_E is the identity into the first d_vocab dims; 4 more dims m_1..m_4 carry what head 0 copies.
    Head 0: the read-off [0] queries d_head dim 0, the signal tokens S_s key on it with weight BETA, so the read-off
    attends (almost) only to A and B; S_s's value is d_head dim s−1, written to m_s. Head 1: random QK and V, W_O = 0.
    Unembedding: logit C(a,b) = m_a + m_b (C(a,a) = 2 m_a − 0.5), and C(1,3) has bias +0.1, so with head 0 gone
    every read-off answers C(1,3)."""
    task = OVCoherentTask()
    V = task.d_vocab
    model = ToyTransformer(ToyConfig(n_layers=1, d_model=V + 4, n_heads=2, d_head=5, d_mlp=None, n_ctx=task.n_ctx,
                                     d_vocab=V, layer_norm=False))
    gen = torch.Generator().manual_seed(1)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        model.W_E[:, :V] = torch.eye(V)
        attn.W_Q[0, 0, 0] = 1.0
        attn.W_K[0, 1:5, 0] = BETA
        for s in range(1, 5):
            attn.W_V[0, s, s - 1] = 1.0
            attn.W_O[0, s - 1, V + s - 1] = 1.0
        for W in (attn.W_Q, attn.W_K, attn.W_V):
            W[1] = torch.randn(W[1].shape, generator=gen)
        for out, (a, b) in zip(task.output_tokens(), task.pairs()):
            model.W_U[V + a - 1, out] += 1.0
            model.W_U[V + b - 1, out] += 1.0
            model.b_U[out] = -0.5 if a == b else 0.0
        model.b_U[_output(task, 1, 3)] += 0.1
    return model.eval(), task


def _output(task: OVCoherentTask, a: int, b: int) -> int:
    return task.output_tokens()[task.pairs().index((a, b))]


def random_model(task, layer_norm: bool = True, n_layers: int = 1, d_mlp: int | None = None, seed: int = 0
                 ) -> ToyTransformer:
    """A random model with non-trivial biases and norm parameters (so folding them matters)."""
    model = ToyTransformer(ToyConfig(n_layers=n_layers, d_model=16, n_heads=2, d_head=4, d_mlp=d_mlp,
                                     n_ctx=task.n_ctx, d_vocab=task.d_vocab, layer_norm=layer_norm, init_std=0.5,
                                     seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.split(".")[-1].startswith("W_"):
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


def write_run(root: Path, model: ToyTransformer, task, log: list[dict] = (), checkpoints: dict = {}) -> str:
    """A run folder in the format of `interplab toy train`."""
    model.save(root / "model")
    config = {"task": task.spec(), "heads": model.cfg.n_heads}
    (root / "config.json").write_text(json.dumps({"kind": "toy train", "config": config}))
    (root / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    for step, ckpt in checkpoints.items():
        ckpt.save(root / "checkpoints" / f"step-{step}")
    return str(root)


def sample(task, n: int = 400, seed: int = 0):
    return task.sample(n, torch.Generator().manual_seed(seed))


# ---- EQKE / EVOU ------------------------------------------------------------------------------------------------
def test_eqke_and_evou_read_back_the_planted_head():
    model, task = planted_ov_model()
    inputs, outputs = task.input_tokens(), task.output_tokens()
    readoff = eqke(model, [0], inputs, task.n_ctx)[0, 0]
    expected = torch.zeros(len(inputs))
    expected[1:5] = BETA / math.sqrt(5)
    torch.testing.assert_close(readoff, expected)
    full = eqke(model, inputs, inputs, task.n_ctx)[0]
    assert full[1:].abs().max() == 0  # only the read-off token queries
    ev = evou(model, inputs, outputs, task.n_ctx)[0]
    planted = torch.tensor([[float((a == s) + (b == s)) for a, b in task.pairs()] for s in inputs])
    torch.testing.assert_close(ev, planted)
    assert evou(model, inputs, outputs, task.n_ctx)[1].abs().max() == 0  # head 1 writes nothing


def test_eqke_evou_match_dense_products_without_layernorm():
    task = OVCoherentTask()
    model = random_model(task, layer_norm=False)
    with torch.no_grad():  # no positions and no biases: EQKE = E W_Q W_Kᵀ Eᵀ / √d_head, EVOU = E W_V W_O W_U
        model.W_pos.zero_()
        for b in ("b_Q", "b_K", "b_V"):
            getattr(model.blocks[0].attn, b).zero_()
    a, E, ids = model.blocks[0].attn, model.W_E.detach(), task.input_tokens()
    for h in range(2):
        qk = (E[ids] @ a.W_Q[h]) @ (E[ids] @ a.W_K[h]).T / 2.0
        torch.testing.assert_close(eqke(model, ids, ids, task.n_ctx)[h], qk.detach())
        ov = E[ids] @ a.W_V[h] @ a.W_O[h] @ model.W_U[:, task.output_tokens()]
        torch.testing.assert_close(evou(model, ids, task.output_tokens(), task.n_ctx)[h], ov.detach())


def test_eqke_with_layernorm_predicts_the_models_attention():
    """With one position embedding for every position, the read-off's log-attention differences between keys are
    EQKE differences exactly (LayerNorm, biases and all)."""
    task = OVCoherentTask()
    model = random_model(task, layer_norm=True)
    with torch.no_grad():
        model.W_pos.copy_(model.W_pos[:1].expand_as(model.W_pos))
    batch = sample(task, 16)
    logp = pattern(model, batch.tokens)[:, :, -1].log()  # [batch head key]
    scores = eqke(model, list(range(task.d_vocab)), list(range(task.d_vocab)), task.n_ctx)  # [head query key]
    predicted = scores[:, batch.tokens[:, -1][:, None], batch.tokens].permute(1, 0, 2)  # [batch head key]
    torch.testing.assert_close(logp - logp[..., :1], predicted - predicted[..., :1], atol=1e-4, rtol=1e-4)


def test_evou_with_layernorm_matches_the_raw_modules():
    """(ln1(e + mean pos) W_V + b_V) W_O, centred, scaled by the final norm's γ, read by W_U — from the modules."""
    task = OVCoherentTask()
    model = random_model(task, layer_norm=True)
    a, ids, outs = model.blocks[0].attn, task.input_tokens(), task.output_tokens()
    with torch.no_grad():
        x = model.blocks[0].ln1(model.W_E[ids] + model.W_pos[: task.n_ctx].mean(0))
        for h in range(2):
            out = (x @ a.W_V[h] + a.b_V[h]) @ a.W_O[h]
            expected = ((out - out.mean(-1, keepdim=True)) * model.ln_final.weight) @ model.W_U[:, outs]
            torch.testing.assert_close(evou(model, ids, outs, task.n_ctx)[h], expected)


# ---- attention and ablation ---------------------------------------------------------------------------------------
def test_planted_head_attends_to_the_pair():
    model, task = planted_ov_model()
    batch = sample(task)
    ro = readouts(task, batch)
    by_group = attention_by_group(pattern(model, batch.tokens), batch.tokens, ro, task.d_vocab)
    assert ro.groups == task.output_tokens()
    for g, (a, b) in enumerate(task.pairs()):
        expected = torch.zeros(task.d_vocab)
        expected[a] += 0.5
        expected[b] += 0.5
        torch.testing.assert_close(by_group[0, g], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(by_group.sum(-1), torch.ones(2, 10))


def test_pair_preference_reads_a_planted_priority_order():
    """Keys weighted S3 > S1 > S4 > S2: in every pair {A ≠ B} the head attends to the higher one, so S3 wins 3 pairs,
    S1 2, S4 1, S2 0; the planted equal-weight head has no order (every pair is split 50/50)."""
    model, task = planted_ov_model()
    with torch.no_grad():
        model.blocks[0].attn.W_K[1] = 0
        model.blocks[0].attn.W_Q[1, 0, 0] = 1.0
        model.blocks[0].attn.W_K[1, 1:5, 0] = BETA * torch.tensor([2.0, 0.0, 3.0, 1.0])
    batch = sample(task)
    ro = readouts(task, batch)
    by_group = attention_by_group(pattern(model, batch.tokens), batch.tokens, ro, task.d_vocab)
    planted, ordered = pair_preference(by_group, ro.groups, dict(zip(task.output_tokens(), task.pairs())))
    assert ordered == {"order": [3, 1, 4, 2], "wins": [3, 2, 1, 0], "total_order": True}
    assert planted == {"order": [1, 2, 3, 4], "wins": [1.5] * 4, "total_order": False}  # every pair a tie


def test_ablating_the_working_head_gives_the_hand_computed_accuracy():
    model, task = planted_ov_model()
    batch = sample(task)
    ro = readouts(task, batch)
    assert group_accuracy(model(batch.tokens), ro) == (1.0, [1.0] * 10)
    pairs = task.pair_of(batch)
    share_13 = float(((pairs[:, 0] == 1) & (pairs[:, 1] == 3)).float().mean())  # head 0 gone: always C(1,3)
    hand = [1.0 if pair == (1, 3) else 0.0 for pair in task.pairs()]
    for method in ("zero", "mean"):
        logits = ablate_heads(model, batch.tokens, method)
        acc, per = group_accuracy(logits[0], ro)
        assert acc == pytest.approx(share_13) and per == hand
        torch.testing.assert_close(logits[1], model(batch.tokens))  # head 1 writes nothing: no change


def test_zero_ablation_equals_deleting_the_heads_output():
    task = OVCoherentTask()
    model = random_model(task)
    tokens = sample(task, 32).tokens
    for h, logits in enumerate(ablate_heads(model, tokens, "zero")):
        without = copy.deepcopy(model)
        with torch.no_grad():
            without.blocks[0].attn.W_O[h] = 0
        torch.testing.assert_close(logits, without(tokens))


def test_mean_ablation_of_a_constant_head_changes_nothing():
    task = OVCoherentTask()
    model = random_model(task)
    with torch.no_grad():  # v = b_V for every token, so the head writes b_V W_O whatever it attends to
        model.blocks[0].attn.W_V[1] = 0
    tokens = sample(task, 32).tokens
    mean = ablate_heads(model, tokens, "mean")
    torch.testing.assert_close(mean[1], model(tokens), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ablate_heads(model, tokens, "zero")[1], model(tokens), atol=1e-3)
    with pytest.raises(InterplabError, match="choose from zero, mean"):
        ablate_heads(model, tokens, "resample")


@pytest.mark.parametrize("shape", [dict(n_layers=2), dict(d_mlp=32)])
def test_circuit_readouts_refuse_other_models(shape):
    task = OVCoherentTask()
    model = random_model(task, **shape)
    ids = task.input_tokens()
    for call in (lambda: eqke(model, ids, ids, task.n_ctx), lambda: evou(model, ids, task.output_tokens(), 8),
                 lambda: ablate_heads(model, sample(task, 4).tokens, "zero")):
        with pytest.raises(InterplabError, match="1-layer attention-only"):
            call()


# ---- Fourier view -------------------------------------------------------------------------------------------------
def fourier_embedding(p: int, d_model: int = 8) -> torch.Tensor:
    """Rows t < p: [cos 3θ, sin 3θ, 2 cos 7θ, 2 sin 7θ, 0...] with θ = 2πt/p; row p ("=") random."""
    t = torch.arange(p, dtype=torch.float64)
    W = torch.zeros(p + 1, d_model, dtype=torch.float64)
    for col, (k, amp) in enumerate([(3, 1.0), (3, 1.0), (7, 2.0), (7, 2.0)]):
        W[:p, col] = amp * (torch.cos if col % 2 == 0 else torch.sin)(2 * math.pi * k * t / p)
    W[p] = torch.randn(d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return W.float()


def test_fourier_power_of_known_cosines():
    p = 31
    power = fourier_power(fourier_embedding(p), p)
    assert power.shape == (p // 2 + 1,)
    expected = torch.zeros(p // 2 + 1)
    expected[3], expected[7] = p ** 2 / 2, 4 * p ** 2 / 2  # |Σ cos|² = |Σ sin|² = p²/4 per unit amplitude
    torch.testing.assert_close(power, expected, atol=1e-2, rtol=1e-5)
    assert top_fraction(power, 2) == pytest.approx(1.0)
    assert top_fraction(power, 1) == pytest.approx(0.8)


def test_fourier_view_before_and_after_the_jump(tmp_path):
    task = make_task("modular-addition:p=31,train_fraction=0.4")
    shape = dict(n_layers=1, d_model=8, n_heads=1, d_head=4, d_mlp=16, n_ctx=3, d_vocab=32, init_std=0.3)
    init, memorised, grokked = (ToyTransformer(ToyConfig(**shape, seed=s)) for s in range(3))
    with torch.no_grad():
        grokked.W_E.copy_(fourier_embedding(31))
    log = [{"step": s, "event": "eval", "phase": "thorough", "metrics": {"test_acc": a}}
           for s, a in [(100, 0.03), (200, 0.04), (300, 0.2), (400, 0.9), (500, 1.0)]]
    root = write_run(tmp_path / "run", grokked, task, log, {0: init, 200: memorised, 500: grokked})
    out = run_toy_inspect(InspectToyConfig(run=root, examples=50))
    f = out["fourier"]
    assert f["jump_step"] == 400  # the first test accuracy >= 0.5
    assert [r["step"] for r in f["checkpoints"]] == [0, 200, 500]  # the final checkpoint is model/, once
    assert f["before"]["step"] == 200 and f["after"]["step"] == 500
    assert f["after"]["top_frequencies"][:2] == [7, 3] and f["after"]["top_fraction"] == pytest.approx(1.0)
    assert f["before"]["top_fraction"] < 0.9
    assert out["circuits"].startswith("skipped") and "heads" not in out  # an MLP model: Fourier view only
    assert set(out["accuracy"]) == {"sample", "train", "test"}
    assert (tmp_path / "run/inspect/figures/fourier.png").read_bytes()[:4] == b"\x89PNG"
    assert "Fourier after (step 500): top-5 share 1.000" in format_summary(out)


def test_jump_step_prefers_the_trainers_summary(tmp_path):
    task = ModularAdditionTask()
    root = write_run(tmp_path, random_model(task), task, [{"step": 5, "test_acc": 0.0}, {"step": 9, "test_acc": 1.0}])
    assert jump_step(load_run(root)) == 9
    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "toy train", "jump_step": 7}))
    assert jump_step(load_run(root)) == 7
    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "toy train", "jump_step": None}))  # no jump seen
    assert jump_step(load_run(root)) is None


# ---- the command ------------------------------------------------------------------------------------------------
def test_run_toy_inspect_end_to_end(tmp_path):
    model, task = planted_ov_model()
    root = write_run(tmp_path / "run", model, task)
    cfg = InspectToyConfig(run=root, examples=300)
    out = run_toy_inspect(cfg)
    assert cfg.out == f"{root}/inspect"
    folder = tmp_path / "run" / "inspect"
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["kind"] == "toy inspect" and saved["accuracy"]["sample"] == 1.0 and saved == out
    saved_config = json.loads((folder / "config.json").read_text())
    assert saved_config == {"kind": "toy inspect", "config": run_settings(out["config"])}
    for name in ("attention", "eqke", "evou", "ablation"):
        assert out["figures"][name] == f"{folder}/figures/{name}.png"
        assert Path(out["figures"][name]).read_bytes()[:4] == b"\x89PNG"
    abl = out["ablation"]
    assert abl["full"]["failing"] == [] and abl["zero"][1]["broken"] == abl["mean"][1]["broken"] == []
    assert len(abl["zero"][0]["broken"]) == 9 and "C(1,3)" not in abl["zero"][0]["broken"]
    assert out["heads"][0]["evou_argmax"]["S2"] == "C(2,2)"
    assert {t for t, _ in out["heads"][0]["attends_to"][:2]} <= {"S1", "S2", "S3", "S4"}
    report = (folder / "report.md").read_text()
    assert "| zero-ablate head 0 | " in report
    assert [line for line in report.splitlines() if line.startswith("- [")] == [
        f"- [{name}](figures/{name}.png)" for name in ("attention", "eqke", "evou", "ablation")]
    summary = format_summary(out)
    assert "head 0: attends to" in summary and "9/10 groups broken" in summary


def test_inspect_refuses_a_foreign_folder_and_leaves_it_alone(tmp_path):
    model, task = planted_ov_model()
    root = write_run(tmp_path / "run", model, task)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "inspect.json").write_text("{}")  # e.g. an older version's output
    with pytest.raises(InterplabError, match="not empty and holds no interplab toy inspect run"):
        run_toy_inspect(InspectToyConfig(run=root, out=str(tmp_path / "out"), examples=20))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["inspect.json"]


def test_inspect_rerun_reports_the_saved_run_and_another_config_is_refused(tmp_path, monkeypatch):
    model, task = planted_ov_model()
    root = write_run(tmp_path / "run", model, task)
    first = run_toy_inspect(InspectToyConfig(run=root, examples=40))
    folder = tmp_path / "run" / "inspect"
    files = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}

    def no_recompute(*args, **kwargs):
        raise AssertionError("a complete run was recomputed")

    monkeypatch.setattr(readouts_module, "readouts", no_recompute)
    assert run_toy_inspect(InspectToyConfig(run=root, out=str(folder), examples=40)) == first
    with pytest.raises(InterplabError, match=r"differs in: config\.seed 0 → 3\)"):
        run_toy_inspect(InspectToyConfig(run=root, examples=40, seed=3))
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == files  # nothing rewritten


def test_inspect_errors(tmp_path):
    with pytest.raises(InterplabError, match="--run is required"):
        run_toy_inspect(InspectToyConfig())
    with pytest.raises(InterplabError, match="does not exist"):
        run_toy_inspect(InspectToyConfig(run=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InterplabError, match="lacks config.json, model/config.json"):
        load_run(tmp_path / "empty")
    task = OVCoherentTask()
    old = write_run(tmp_path / "old", random_model(task), task)
    (tmp_path / "old" / "config.json").write_text(json.dumps({"task": task.spec()}))  # before runs had a kind
    with pytest.raises(InterplabError, match="not a toy train run's config"):
        load_run(old)
    task = OVCoherentTask()
    root = write_run(tmp_path / "deep", random_model(task, n_layers=2), task)
    with pytest.raises(InterplabError, match="needs a 1-layer attention-only model"):
        run_toy_inspect(InspectToyConfig(run=root, examples=10))
