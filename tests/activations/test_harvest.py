"""Harvest end to end on a tiny GPT-2: contents, several hooks in one pass, resume after a kill, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from interplab.activations import ActivationStore
from interplab.activations.configs import HarvestConfig
from interplab.activations.harvest import harvest
from interplab.data import iter_contexts
from interplab.models import load_model

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.mlp.hook_post"]


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir):
    return load_model(str(tiny_gpt2_dir), device="cpu")


def _cfg(model, out, **kw) -> HarvestConfig:
    base = dict(model=model.info.spec, hooks=HOOKS, corpus="python-docs", tokens=2000, ctx_len=32, batch_size=4,
                contexts_per_shard=8, out=str(out))
    return HarvestConfig(**{**base, **kw})


def test_store_holds_the_models_activations_on_the_corpus_tokens(model, tmp_path):
    result = harvest(_cfg(model, tmp_path / "s"), model, progress=False)
    assert result.n_contexts == 63 and result.n_tokens == 63 * 32  # ceil(2000 / 32) contexts
    store = ActivationStore(str(tmp_path / "s"))
    assert store.complete and store.hooks == HOOKS and store.n_tokens == 2016
    assert store.d("blocks.1.mlp.hook_post") == 128 and store.d("blocks.0.hook_resid_post") == 32
    contexts = list(store.iter_contexts(HOOKS))
    tokens = torch.cat([c["tokens"] for c in contexts]).long()
    expected_tokens = torch.stack(_take(iter_contexts("python-docs", model.tokenizer, 32), 63))
    assert torch.equal(tokens, expected_tokens)
    cache = model.run_with_cache(tokens, HOOKS).cache
    for hook in HOOKS:
        stored = torch.cat([c[hook] for c in contexts])
        torch.testing.assert_close(stored, cache[hook], rtol=1e-5, atol=1e-5)
    # one forward pass served every hook: resid_pre of block 1 is resid_post of block 0
    assert torch.equal(torch.cat([c["blocks.1.hook_resid_pre"] for c in contexts]),
                       torch.cat([c["blocks.0.hook_resid_post"] for c in contexts]))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_memory_url_and_half_precision(model):
    out = "memory://harvest-test/store"
    harvest(_cfg(model, out, dtype="float16", tokens=320), model, progress=False)
    store = ActivationStore(out)
    assert store.manifest["dtype"] == "float16" and store.n_tokens == 320
    assert next(store.iter_batches("blocks.0.hook_resid_post", 16, shuffle=False)).dtype == torch.float16


def test_rerun_of_a_complete_store_does_nothing(model, tmp_path):
    cfg = _cfg(model, tmp_path / "s", tokens=256)
    harvest(cfg, model, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    assert harvest(_cfg(model, tmp_path / "s", tokens=256, resume=True), model, progress=False).already_complete
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}


def _harvest_command(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "interplab", "harvest", "--model", str(model_dir),
            "--hooks", "blocks.0.hook_resid_post,blocks.2.hook_mlp_out", "--corpus", "python-docs",
            "--tokens", str(64 * 300), "--ctx-len", "64", "--batch-size", "4", "--contexts-per-shard", "8",
            "--device", "cpu", "--out", str(out)]


def _start_and_stop_after_shards(cmd: list[str], out: Path, n_shards: int, sig: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= n_shards:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, f"harvest ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".lock")}


def test_killed_harvest_resumes_byte_identical(wide_gpt2_dir, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_harvest_command(wide_gpt2_dir, reference), check=True, capture_output=True)

    proc = _start_and_stop_after_shards(_harvest_command(wide_gpt2_dir, killed), killed, 3, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"] and 3 <= len(partial["shards"]) < 38
    ActivationStore(str(killed))  # the partial store is readable: every listed shard is whole

    rerun = subprocess.run(_harvest_command(wide_gpt2_dir, killed), capture_output=True, text=True)
    assert rerun.returncode == 2 and "--resume" in rerun.stderr  # refuses to silently restart
    subprocess.run(_harvest_command(wide_gpt2_dir, killed) + ["--resume"], check=True, capture_output=True)

    got, want = _files(killed), _files(reference)
    assert sorted(got) == sorted(want)
    manifest_got, manifest_want = (json.loads(f.pop("manifest.json")) for f in (got, want))
    manifest_got.pop("created"), manifest_want.pop("created")
    assert manifest_got == manifest_want
    assert got == want  # every shard byte for byte


def test_ctrl_c_leaves_a_resumable_store(wide_gpt2_dir, tmp_path):
    out = tmp_path / "interrupted"
    proc = _start_and_stop_after_shards(_harvest_command(wide_gpt2_dir, out), out, 1, signal.SIGINT)
    assert proc.returncode == 130
    assert "rerun with --resume" in proc.stderr.read()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    store = ActivationStore(str(out))
    assert not store.complete and store.n_contexts % 8 == 0
