"""The SAE trainer: it learns planted features, sweeps share batches, schedules, dead latents, resampling,
normalisation folding, NaN handling, stream mode and wandb."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from test_sources import HOOK, poison_shard, synthetic, synthetic_store

import interplab.sae.trainer as trainer_module
from interplab.errors import InterplabError
from interplab.sae.files import load_sae
from interplab.sae.registry import make_sae
from interplab.sae.relu import ReLUSAE
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("store") / "acts"
    synthetic_store(path)  # 128 contexts x 16 = 2,048 tokens of d=32
    return str(path)


def config(store: str, out: Path, **kw) -> TrainConfig:
    base = dict(store=store, arch="topk", k=[2], expansion=[2], tokens=2048, batch_size=128, lr=1e-2, log_every=4,
                checkpoint_every=0, out=str(out))
    return TrainConfig(**{**base, **kw})


def fvu(recon: torch.Tensor, x: torch.Tensor) -> float:
    return float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_topk_learns_planted_features_and_saves_the_run_layout(store, tmp_path):
    out = tmp_path / "run"
    result = train(config(store, out, tokens=6144, lr=3e-2), progress=False)  # three passes over the store
    name = "topk-k2-x2"
    assert result.names == [name] and (result.steps, result.tokens) == (48, 6144)
    held_out = synthetic(4096, seed=99)
    untrained = make_sae(result.saes[name].cfg)
    untrained.initialize(held_out * result.scale, seed=0)
    with torch.no_grad():
        assert fvu(untrained(held_out * result.scale), held_out * result.scale) > 0.5  # the control
        assert fvu(result.saes[name](held_out * result.scale), held_out * result.scale) < 0.1
        saved = load_sae(str(out / name))  # reads raw activations
        assert fvu(saved(held_out), held_out) < 0.1

    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["metrics.json", name, "train_config.json"]
    assert sorted(p.name for p in (out / name).iterdir()) == [
        "cfg.json", "metrics.json", "sae_weights.safetensors", "train_config.json"]
    metrics = json.loads((out / name / "metrics.json").read_text())
    assert metrics["tokens"] == 6144 and metrics["steps"] == 48 and metrics["l0"] == pytest.approx(2, abs=0.1)
    assert 0 <= metrics["fvu"] < 0.1 and metrics["mse"] > 0 and 0 <= metrics["dead_fraction"] <= 1
    assert metrics["tokens_per_s"] > 0
    assert [h["step"] for h in metrics["history"]] == list(range(4, 49, 4))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["complete"] and summary["saes"][name]["fvu"] == metrics["fvu"]
    assert json.loads((out / "train_config.json").read_text())["k"] == [2]
    sae_cfg = json.loads((out / name / "cfg.json").read_text())
    assert sae_cfg["metadata"]["hook_name"] == HOOK and sae_cfg["d_sae"] == 64


def test_a_sweep_trains_every_sae_on_the_same_batches(store, tmp_path):
    def run(out: str, k: list[int]) -> tuple[list[float], dict]:
        sums: list[float] = []
        result = train(config(store, tmp_path / out, k=k, tokens=1024),
                       callback=lambda t: sums.append(float(t.batch.double().sum())), progress=False)
        return sums, result.saes

    sweep_sums, sweep = run("sweep", [2, 3])
    single_sums, single = run("single", [3])
    assert sorted(sweep) == ["topk-k2-x2", "topk-k3-x2"] and len(sweep_sums) == 8
    assert sweep_sums == single_sums
    a, b = sweep["topk-k3-x2"].state_dict(), single["topk-k3-x2"].state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(sweep["topk-k2-x2"].W_dec, sweep["topk-k3-x2"].W_dec)


def test_learning_rate_schedule_at_hand_computed_steps(store, tmp_path):
    cfg = TrainConfig(lr=1.0, lr_warmup_steps=4, lr_decay_start=0.5)
    assert [cfg.lr_at(s, 20) for s in (0, 1, 2, 3, 4, 9, 10, 15, 19)] == [
        0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5, 0.1]
    overlapping = TrainConfig(lr=1.0, lr_warmup_steps=10, lr_decay_start=0.5)
    assert overlapping.lr_at(6, 10) == pytest.approx(0.7) and overlapping.lr_at(8, 10) == pytest.approx(0.4)
    assert TrainConfig(lr=1.0, lr_decay_start=1.0).lr_at(9, 10) == 1.0

    seen: list[float] = []  # the rate each step actually used
    train(config(store, tmp_path / "o", tokens=1024, lr=1e-2, lr_warmup_steps=2, lr_decay_start=0.5),
          callback=lambda t: seen.append(t.runs["topk-k2-x2"].optimizer.param_groups[0]["lr"]), progress=False)
    assert seen == pytest.approx([0.005, 0.01, 0.01, 0.01, 0.01, 0.0075, 0.005, 0.0025])


def test_sparsity_coefficient_warms_up_linearly(store, tmp_path, monkeypatch):
    cfg = TrainConfig(sparsity_warmup_steps=4)
    assert [cfg.sparsity_factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert TrainConfig().sparsity_factor(0) == 1.0

    seen: list[float] = []
    forward = ReLUSAE.training_forward

    def spy(self, x, *, sparsity_coefficient=None, dead_mask=None):
        seen.append(sparsity_coefficient)
        return forward(self, x, sparsity_coefficient=sparsity_coefficient, dead_mask=dead_mask)

    monkeypatch.setattr(ReLUSAE, "training_forward", spy)
    train(config(store, tmp_path / "o", arch="relu", l1_coefficient=[2.0], tokens=768, lr=1e-3,
                 sparsity_warmup_steps=4), progress=False)
    assert seen == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def kill_latents(latents: list[int], at_step: int = 1):
    """A callback that, after step `at_step`, makes `latents` of every (ReLU) SAE unable to fire."""
    def callback(t) -> None:
        if t.step == at_step:
            for run in t.runs.values():
                with torch.no_grad():
                    run.sae.b_enc[latents] = -1e4
    return callback


def test_dead_latents_are_counted_in_tokens_and_reset_when_they_fire(store, tmp_path, monkeypatch):
    B = 128
    seen: list[tuple] = []  # (fired, dead_mask given to the loss) of every step
    forward = ReLUSAE.training_forward

    def spy(self, x, *, sparsity_coefficient=None, dead_mask=None):
        out = forward(self, x, sparsity_coefficient=sparsity_coefficient, dead_mask=dead_mask)
        seen.append((out.fired.clone(), dead_mask.clone()))
        return out

    monkeypatch.setattr(ReLUSAE, "training_forward", spy)
    since: list[torch.Tensor] = []
    kill = kill_latents([0])

    def callback(t) -> None:
        kill(t)
        since.append(t.runs["relu-l1c1-x2"].since_fired.clone())

    result = train(config(store, tmp_path / "o", arch="relu", l1_coefficient=[1.0], tokens=12 * B, lr=1e-3,
                          dead_tokens=2 * B), callback=callback, progress=False)  # cap: 3 * B, not reached
    previous = torch.zeros(64, dtype=torch.long)
    for step, ((fired, dead_mask), counts) in enumerate(zip(seen, since, strict=True), start=1):
        assert torch.equal(dead_mask, previous >= 2 * B)  # the AuxK mask the loss was given
        assert torch.equal(counts, torch.where(fired, 0, previous + B))  # fired: reset; else B more tokens
        if step >= 2:
            assert not fired[0]
        previous = counts
    assert fired.any() and [int(c[0]) for c in since] == [s * B for s in range(12)]
    assert [bool(c[0] >= 2 * B) for c in since] == [False] * 2 + [True] * 10  # dead from 2 * B tokens on
    assert result.metrics["relu-l1c1-x2"]["dead_fraction"] == float((since[-1] >= 2 * B).float().mean()) > 0

    assert TrainConfig(dead_tokens=10_000_000, batch_size=100).dead_window(40) == 1000  # a quarter of the run
    assert TrainConfig(dead_tokens=500, batch_size=100).dead_window(40) == 500
    assert TrainConfig(dead_tokens=500, batch_size=100).dead_window(2) == 100  # at least one batch


@pytest.mark.parametrize("arch, resample_every", [("relu", 0), ("relu", 4), ("topk", 4)])
def test_resampling_revives_dead_latents(store, tmp_path, arch, resample_every):
    B, dead = 128, [0, 1, 2, 3]
    name = f"{arch}-l1c1-x2" if arch == "relu" else f"{arch}-k2-x2"
    kill = kill_latents(dead)
    checked, since = [], []

    def callback(t) -> None:
        kill(t)
        run = t.runs[name]
        since.append(run.since_fired.clone())
        if t.step == 4 and resample_every:  # just resampled: toward inputs of this batch, Adam moments reset
            W_dec = run.sae.W_dec[dead]
            assert torch.allclose(W_dec.norm(dim=1), torch.ones(4))
            seen = t.batch - run.sae.b_dec if arch == "topk" else t.batch  # the input as the encoder reads it
            cosines = torch.nn.functional.normalize(seen, dim=1) @ W_dec.T
            assert torch.allclose(cosines.max(0).values, torch.ones(4))
            assert torch.equal(run.sae.b_enc[dead], torch.zeros(4)) and not run.since_fired[dead].any()
            state = run.optimizer.state[run.sae.W_enc]
            assert not state["exp_avg"][:, dead].any() and not state["exp_avg_sq"][:, dead].any()
            checked.append(True)

    result = train(config(store, tmp_path / "o", arch=arch, l1_coefficient=[1.0], tokens=12 * B, lr=1e-3,
                          dead_tokens=2 * B, resample_every=resample_every), callback=callback, progress=False)
    b_enc = result.saes[name].b_enc.detach()[dead]
    if arch == "topk":
        assert checked == [True]
    elif resample_every:  # revived: they fire again, and stay alive to the end
        assert checked == [True] and (since[-1][dead] < 2 * B).all() and b_enc.min() > -1
    else:
        assert (since[-1][dead] == 11 * B).all() and torch.allclose(b_enc, torch.full((4,), -1e4))


def test_normalisation_is_folded_into_the_saved_sae(tmp_path):
    x = synthetic_store(tmp_path / "s", n_contexts=32, scale=7.0).flatten(0, 1)  # 512 raw tokens, |x|^2 ~ 100
    # every position (exclude_bos off), so that 512 tokens are exactly one pass and the estimate is exact
    result = train(config(str(tmp_path / "s"), tmp_path / "o", tokens=512, exclude_bos=False), progress=False)
    assert x.mul(result.scale).pow(2).sum(1).mean() == pytest.approx(32, rel=1e-4)
    trained, saved = result.saes["topk-k2-x2"], load_sae(str(tmp_path / "o" / "topk-k2-x2"))
    held_out = synthetic(1000, seed=5) * 7.0
    with torch.no_grad():
        torch.testing.assert_close(saved.encode(held_out), trained.encode(held_out * result.scale),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(saved(held_out), trained(held_out * result.scale) / result.scale,
                                   rtol=1e-4, atol=1e-4)

    raw = train(config(str(tmp_path / "s"), tmp_path / "raw", tokens=512, normalize=False), progress=False)
    saved = load_sae(str(tmp_path / "raw" / "topk-k2-x2"))
    assert raw.scale == 1.0 and torch.equal(saved.W_enc, raw.saes["topk-k2-x2"].W_enc)


def test_nan_in_a_shard_stops_with_step_and_shard_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "s"
    synthetic_store(path, n_contexts=32, ctx_len=16, per_shard=2)  # 16 shards of 32 rows
    # The shard order of pass 0 is a seeded permutation; poison the one read last, so checkpoints exist by then.
    last = int(torch.randperm(16, generator=torch.Generator().manual_seed(0))[-1])
    poison_shard(path, last)
    monkeypatch.setattr(trainer_module, "INIT_TOKENS", 32)  # initialise from the first batch only
    out = tmp_path / "o"
    snapshots: dict[int, bytes] = {}
    with pytest.raises(InterplabError) as info:
        train(config(str(path), out, batch_size=32, tokens=512, checkpoint_every=1),
              callback=lambda t: snapshots.__setitem__(t.step, (out / "checkpoint.pt").read_bytes()), progress=False)
    message = str(info.value)
    step = int(message.split(":")[0].removeprefix("step "))
    assert f"shard-{last:05d}.safetensors" in message and "non-finite" in message and step > 2
    assert f"the last checkpoint (step {step - 1}) is intact" in message
    assert (out / "checkpoint.pt").read_bytes() == snapshots[step - 1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in ckpt["runs"]["topk-k2-x2"]["sae"].values())
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["checkpoint.pt", "train_config.json"]


def test_a_diverging_loss_stops_training_naming_the_step(store, tmp_path):
    with pytest.raises(InterplabError, match=r"^step 2: the loss of relu-l1c5-x2 is not finite; training stopped"):
        train(config(store, tmp_path / "o", arch="relu", lr=1e30), progress=False)
    assert not (tmp_path / "o" / "relu-l1c5-x2").exists()


def test_stream_mode_trains_on_a_model_and_saves(tiny_gpt2_dir, tmp_path):
    cfg = TrainConfig(model=str(tiny_gpt2_dir), hook=HOOK, corpus="python-docs", ctx_len=16, tokens=1024,
                      batch_size=128, shuffle_buffer=256, k=[4], expansion=[2], lr=1e-2, device="cpu",
                      out=str(tmp_path / "o"))
    result = train(cfg, progress=False)
    metrics = result.metrics["topk-k4-x2"]
    assert result.steps == 8 and 0 < metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(4, abs=0.5)
    saved = load_sae(str(tmp_path / "o" / "topk-k4-x2"))
    assert (saved.cfg.d_in, saved.cfg.d_sae, saved.cfg.hook_name) == (32, 64, HOOK)
    assert saved.cfg.model == str(tiny_gpt2_dir)


def test_wandb_is_imported_only_when_asked_and_gets_every_saes_metrics(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(InterplabError, match=r"wandb is not installed: pip install interplab\[wandb\]"):
        train(config(store, tmp_path / "o", wandb_project="p"), progress=False)
    assert not (tmp_path / "o").exists()
    train(config(store, tmp_path / "plain", tokens=256), progress=False)  # not set: not imported

    logged: list[tuple[dict, int]] = []
    run = types.SimpleNamespace(log=lambda data, step: logged.append((data, step)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    train(config(store, tmp_path / "w", k=[2, 3], tokens=1024, wandb_project="p"), progress=False)
    assert [step for _, step in logged] == [4, 8]
    assert {"topk-k2-x2/fvu", "topk-k3-x2/fvu", "topk-k3-x2/dead_fraction", "topk-k2-x2/lr"} <= set(logged[0][0])
