"""Data-parallel SAE training under torchrun (2 CPU ranks, gloo) against one process on the same whole batch, the
kill-and-resume path, and one run per hook spread over ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sources import synthetic, synthetic_store

from interplab.activations.writer import StoreWriter
from interplab.distributed import Ranks
from interplab.errors import InterplabError
from interplab.sae.data_parallel import reduce_gradients
from interplab.sae.per_hook import hooks_of_rank, train_hooks
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train


def flags(cfg: TrainConfig) -> list[str]:
    """The CLI flags that give `cfg` (the fields the tests set)."""
    out = []
    for name in ("store", "synthetic", "arch", "tokens", "batch_size", "lr", "log_every", "checkpoint_every",
                 "dead_tokens", "out"):
        value = getattr(cfg, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    for name in ("k", "expansion"):
        out += [f"--{name}", ",".join(map(str, getattr(cfg, name)))]
    if cfg.hooks:
        out += ["--hooks", ",".join(cfg.hooks)]
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    (sae_dir,) = [p for p in folder.iterdir() if (p / "sae_weights.safetensors").exists()]
    return load_file(sae_dir / "sae_weights.safetensors")


def history(folder: Path) -> list[dict]:
    (sae_dir,) = [p for p in folder.iterdir() if (p / "metrics.json").exists() and p.is_dir()]
    return json.loads((sae_dir / "metrics.json").read_text())["history"]


def assert_same_run(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        scale = float(wa[name].abs().max()) or 1.0
        assert torch.allclose(wa[name], wb[name], atol=atol * scale, rtol=0), \
            f"{name}: max diff {float((wa[name] - wb[name]).abs().max()):.3g} (scale {scale:.3g})"
    ha, hb = history(a), history(b)
    assert [e["step"] for e in ha] == [e["step"] for e in hb]
    for ea, eb in zip(ha, hb):
        for key in ("fvu", "l0", "dead_fraction", "loss"):
            assert eb[key] == pytest.approx(ea[key], rel=1e-3, abs=1e-4), (key, ea["step"])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dp") / "acts"
    synthetic_store(path)  # 128 contexts x 16 tokens of d=32, sparse sums of 24 planted directions
    return str(path)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_two_ranks_train_the_same_sae_as_one_process_on_the_whole_batch(store, tmp_path, torchrun, arch):
    # 300 steps of 256 tokens; 64 latents for 24 features, so latents die and AuxK trains them (dead_tokens 2048).
    cfg = TrainConfig(store=store, arch=arch, k=[3], expansion=[2], tokens=300 * 256, batch_size=256, lr=3e-3,
                      log_every=50, checkpoint_every=0, dead_tokens=2048, out=str(tmp_path / "one"))
    one = train(cfg, progress=False)
    cfg.out = str(tmp_path / "two")
    torchrun(["-m", "interplab", "sae", "train", *flags(cfg)])  # each rank: 128 rows of every 256-row batch
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-4)
    hist = history(tmp_path / "two")
    assert max(e["dead_fraction"] for e in hist) > 0  # AuxK had dead latents to train: the reduced counters matter
    assert hist[-1]["fvu"] < 0.5 * hist[0]["fvu"]  # and it learned
    summary = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert summary["tokens"] == one.tokens == 300 * 256


def _rank_pids(job: str) -> dict[int, int]:
    """{rank: pid} of the torchrun workers whose environment holds INTERPLAB_TEST_JOB=job."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("INTERPLAB_TEST_JOB") == job and "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.slow
def test_killing_one_rank_fails_the_job_cleanly_and_resume_finishes_it(tmp_path, torchrun):
    cfg = TrainConfig(synthetic="sparse", arch="topk", k=[8], expansion=[4], tokens=600 * 256, batch_size=256,
                      lr=1e-3, log_every=100, checkpoint_every=40, out=str(tmp_path / "two"))
    job = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INTERPLAB_TEST_JOB": job}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "interplab", "sae", "train", *flags(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "two" / "checkpoint.pt").exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        os.kill(_rank_pids(job)[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)  # fails, and does not hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, "the job went on without rank 1"
    assert "Signals.SIGKILL" in stderr or "SIGKILL" in stderr, stderr[-3000:]
    assert not (tmp_path / "two" / "metrics.json").exists()  # not marked complete
    resumed_at = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < resumed_at < 600

    done = torchrun(["-m", "interplab", "sae", "train", *flags(cfg), "--resume"])
    assert f"resumed at step {resumed_at}" in done.stdout
    cfg.out = str(tmp_path / "uninterrupted")
    torchrun(["-m", "interplab", "sae", "train", *flags(cfg)])
    # The same job, never interrupted: a checkpoint holds everything a step depends on, so bit for bit. (Against one
    # process the runs agree only to float rounding, which TopK's choices amplify over many steps.)
    assert_same_run(tmp_path / "uninterrupted", tmp_path / "two", atol=0.0)


def two_hook_store(path: Path) -> tuple[str, str]:
    """A store whose two hooks hold different data (different planted mixtures), so runs cannot be confused."""
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    acts = {h: synthetic(64 * 16, seed=seed).view(64, 16, -1) for seed, h in enumerate(hooks, start=5)}
    with StoreWriter(str(path), config={"model": "synthetic"}, hooks=list(hooks),
                     shapes={h: (16, acts[h].shape[-1]) for h in hooks}, contexts_per_shard=16) as writer:
        writer.add(acts, torch.zeros(64, 16, dtype=torch.long))
        writer.finish()
    return hooks


def test_hooks_are_spread_over_ranks_each_rank_training_its_own(tmp_path, torchrun):
    hooks = two_hook_store(tmp_path / "acts")
    cfg = TrainConfig(store=str(tmp_path / "acts"), hooks=list(hooks), arch="topk", k=[2], expansion=[2],
                      tokens=40 * 128, batch_size=128, lr=3e-3, log_every=10, checkpoint_every=0,
                      out=str(tmp_path / "two"))
    done = torchrun(["-m", "interplab", "sae", "train", *flags(cfg)])
    assert f"rank 0 of 2 trains {hooks[0]}" in done.stdout and f"rank 1 of 2 trains {hooks[1]}" in done.stdout
    cfg.out = str(tmp_path / "one")
    results = train_hooks(cfg, progress=False)  # one process: both hooks, one after another
    assert sorted(results) == sorted(hooks)
    for hook in hooks:
        assert_same_run(tmp_path / "one" / hook, tmp_path / "two" / hook, atol=1e-6)
    assert not torch.equal(weights(tmp_path / "two" / hooks[0])["W_dec"], weights(tmp_path / "two" / hooks[1])["W_dec"])


def test_hooks_of_rank_deals_hooks_round_robin():
    hooks = ["a", "b", "c", "d", "e"]
    assert [hooks_of_rank(hooks, Ranks(r, 2, r)) for r in range(2)] == [["a", "c", "e"], ["b", "d"]]
    assert hooks_of_rank(["a"], Ranks(1, 2, 1)) == []


def test_reduce_gradients_in_one_process_keeps_gradients_and_returns_the_stats():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    q = torch.nn.Parameter(torch.ones(2, 2))  # no gradient: counts as zeros
    stats = reduce_gradients([p, q], torch.tensor([5.0, 7.0]), world_size=1)
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0])) and torch.equal(q.grad, torch.zeros(2, 2))
    assert torch.equal(stats, torch.tensor([5.0, 7.0]))


def test_data_parallel_config_errors(store, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InterplabError, match="--batch-size 255 does not split evenly over 2 ranks"):
        train(TrainConfig(store=store, batch_size=255, tokens=1000, out=str(tmp_path / "a")), progress=False)
    with pytest.raises(InterplabError, match="stream mode .* under torchrun"):
        train(TrainConfig(model="unused", hook="h", tokens=1000, out=str(tmp_path / "b")), progress=False)
    with pytest.raises(InterplabError, match="--hooks lists a hook twice"):
        TrainConfig(store=store, hooks=["a", "a"]).validate()
    with pytest.raises(InterplabError, match="without --hook and without --synthetic"):
        TrainConfig(store=store, hook="a", hooks=["a", "b"]).validate()
