"""Checkpoints and the run folder: an interrupted run resumes to the same bits, atomic writes, refused folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_sources import HOOK, synthetic_store

import interplab.fileio
from interplab.errors import InterplabError
from interplab.sae.files import load_sae
from interplab.sae.checkpoint import (
    inspect_run_folder,
    load_checkpoint,
    save_checkpoint,
    save_sae_folder,
)
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("store") / "acts"
    synthetic_store(path, n_contexts=64)  # 1,024 tokens
    return str(path)


def config(store: str | None, out: Path, **kw) -> TrainConfig:
    base = dict(store=store, arch="topk", k=[2, 3], expansion=[2], tokens=1536, batch_size=128, lr=1e-2,
                log_every=2, checkpoint_every=3, out=str(out))
    return TrainConfig(**{**base, **kw})


def stop_at(step: int):
    def callback(t) -> None:
        if t.step == step:
            raise KeyboardInterrupt
    return callback


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


SWEEPS = {
    "topk": dict(arch="topk", k=[2, 3]),
    "relu+resampling": dict(arch="relu", k=[2], l1_coefficient=[0.5, 2.0], resample_every=4, dead_tokens=256,
                            sparsity_warmup_steps=5, lr_warmup_steps=3, lr=1e-3),
    "jumprelu": dict(arch="jumprelu", k=[2], l0_coefficient=[1e-3, 1e-2], sparsity_warmup_steps=5),
    "batchtopk": dict(arch="batchtopk", k=[2, 3]),
}


def kill_then_watch_resampling(resampled: list[int]):
    """After step 1, make latents 0-2 of every SAE unable to fire; record the steps at which they came back."""
    def callback(t) -> None:
        for run in t.runs.values():
            with torch.no_grad():
                if t.step == 1:
                    run.sae.b_enc[:3] = -1e4
                elif bool((run.sae.b_enc[:3] == 0).all()):
                    resampled.append(t.step)
    return callback


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_resume_ends_bit_identical_to_an_uninterrupted_run(store, tmp_path, sweep):
    """12 steps (1.5 passes over the store) straight, against 7 steps, a kill, and a resume from step 6."""
    resampled: list[int] = []
    watch = kill_then_watch_resampling(resampled) if "resampling" in sweep else (lambda t: None)
    whole = train(config(store, tmp_path / "whole", **SWEEPS[sweep]), callback=watch, progress=False)
    assert resampled == ([4, 4] if "resampling" in sweep else [])  # both SAEs, in the first half

    out = tmp_path / "cut"
    stop = stop_at(7)
    with pytest.raises(KeyboardInterrupt):
        train(config(store, out, **SWEEPS[sweep]), callback=lambda t: (watch(t), stop(t)), progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["checkpoint.pt", "train_config.json"]
    assert load_checkpoint(str(out))["step"] == 6

    resumed = train(config(store, out, resume=True, **SWEEPS[sweep]), progress=False)
    assert resumed.resumed_from == 6 and resumed.names == whole.names and len(whole.names) == 2
    for name in whole.names:
        a, b = whole.saes[name].state_dict(), resumed.saes[name].state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a), name
        assert folder_bytes(tmp_path / "whole" / name)["sae_weights.safetensors"] == \
            folder_bytes(out / name)["sae_weights.safetensors"]
        history = [json.loads((folder / name / "metrics.json").read_text())["history"]
                   for folder in (tmp_path / "whole", out)]
        assert history[0] == history[1]
    assert not (out / "checkpoint.pt").exists() and (out / "metrics.json").exists()


def test_stream_mode_resumes_bit_identically(tiny_gpt2_dir, tmp_path):
    kw = dict(model=str(tiny_gpt2_dir), hook=HOOK, ctx_len=16, shuffle_buffer=256, tokens=1024,
              k=[2, 4], device="cpu")
    whole = train(config(None, tmp_path / "whole", **kw), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config(None, tmp_path / "cut", **kw), callback=stop_at(5), progress=False)
    resumed = train(config(None, tmp_path / "cut", resume=True, **kw), progress=False)
    assert resumed.resumed_from == 3
    for name in whole.names:
        assert torch.equal(whole.saes[name].W_enc, resumed.saes[name].W_enc)
        assert torch.equal(whole.saes[name].b_dec, resumed.saes[name].b_dec)


def test_a_partial_run_needs_resume_and_a_complete_one_is_left_alone(store, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        train(config(store, out), callback=stop_at(4), progress=False)
    with pytest.raises(InterplabError, match=r"holds a partial run \(checkpoint at step 3\); pass --resume"):
        train(config(store, out), progress=False)
    train(config(store, out, resume=True), progress=False)
    before = folder_bytes(out)
    again = train(config(store, out, resume=True), progress=False)
    assert again.already_complete and again.names == ["topk-k2-x2", "topk-k3-x2"] and again.steps == 12
    assert again.metrics["topk-k2-x2"]["fvu"] == json.loads((out / "metrics.json").read_text())["saes"][
        "topk-k2-x2"]["fvu"]
    assert folder_bytes(out) == before


def test_a_folder_holding_another_run_or_other_files_is_refused_untouched(store, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        train(config(store, out), callback=stop_at(4), progress=False)
    before = folder_bytes(out)
    with pytest.raises(InterplabError,
                       match=r"holds a different SAE run \(differs in: k \[2, 3\] → \[4\], lr 0\.01 → 0\.001\); choose another --out"):
        train(config(store, out, k=[4], lr=1e-3, resume=True), progress=False)
    assert folder_bytes(out) == before
    train(config(store, out, device="cpu", checkpoint_every=5, resume=True), progress=False)  # not identity

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InterplabError, match="not empty and holds no interplab SAE run \\(found notes.txt\\)"):
        inspect_run_folder(str(tmp_path / "other"), config(store, out).identity())


def test_resuming_on_data_of_another_width_is_refused(tmp_path):
    store = tmp_path / "s"
    synthetic_store(store, n_contexts=64)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        train(config(str(store), out), callback=stop_at(4), progress=False)
    before = folder_bytes(out)
    for p in store.iterdir():
        p.unlink()
    synthetic_store(store, n_contexts=64, d=16)
    with pytest.raises(InterplabError, match=r"has changed since the run in .* \(4 shards, 1,024 tokens, d=32, "
                                             r"complete, manifest \w+ → 4 shards, 1,024 tokens, d=16, complete"):
        train(config(str(store), out, resume=True), progress=False)
    assert folder_bytes(out) == before


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    out = str(tmp_path)
    save_checkpoint(out, {"step": 1, "w": torch.ones(3)})

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(interplab.fileio.os, "replace", killed)  # killed between writing and renaming
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(out)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]

    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InterplabError, match="checkpoint.pt cannot be read .*; delete it to restart the run"):
        load_checkpoint(out)


def test_an_sae_folder_is_replaced_whole(store, tmp_path):
    result = train(config(store, tmp_path / "run", k=[2], tokens=256), progress=False)
    sae = result.saes["topk-k2-x2"]
    (tmp_path / "o" / "x").mkdir(parents=True)
    (tmp_path / "o" / "x" / "stale.txt").write_text("old")
    save_sae_folder(str(tmp_path / "o"), "x", sae, metadata={}, files={"metrics.json": {"fvu": 0.5}})
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x"]
    assert sorted(p.name for p in (tmp_path / "o" / "x").iterdir()) == [
        "cfg.json", "metrics.json", "sae_weights.safetensors"]
    assert torch.equal(load_sae(str(tmp_path / "o" / "x")).W_dec, sae.W_dec)
