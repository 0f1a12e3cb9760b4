"""`interplab sae train --shard-latents` under torchrun (2 CPU ranks): each rank holds half of every SAE's latents,
and the run equals the unsharded one, fresh and after a stop and --resume."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_data_parallel import assert_same_run, flags, history
from test_sources import synthetic_store

from interplab.errors import InterplabError
from interplab.sae.checkpoint import load_checkpoint, save_checkpoint
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sharded") / "acts"
    synthetic_store(path)
    return str(path)


def config(store: str, out: Path, **kw) -> TrainConfig:
    # 64 latents for 24 planted features: latents die (dead_tokens 2048) and AuxK trains them, across both halves.
    base = dict(store=store, arch="topk", k=[3], expansion=[2], tokens=200 * 256, batch_size=256, lr=3e-3,
                log_every=25, checkpoint_every=0, dead_tokens=2048, shard_latents=True, out=str(out))
    return TrainConfig(**{**base, **kw})


def test_latent_sharded_run_equals_the_unsharded_run(store, tmp_path, torchrun):
    cfg = config(store, tmp_path / "one")
    train(cfg, progress=False)  # one process: --shard-latents changes nothing
    cfg.out = str(tmp_path / "two")
    torchrun(["-m", "interplab", "sae", "train", *flags(cfg), "--shard-latents"])
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-4)
    assert max(e["dead_fraction"] for e in history(tmp_path / "two")) > 0  # dead latents, counted over both ranks


def test_latent_sharded_run_resumes_from_its_per_rank_checkpoint(store, tmp_path, torchrun):
    cfg = config(store, tmp_path / "two", checkpoint_every=40)
    driver = Path(__file__).with_name("shard_resume_driver.py")
    torchrun([str(driver), json.dumps(asdict(cfg)), "120"])
    cfg.out, cfg.checkpoint_every = str(tmp_path / "one"), 0
    train(cfg, progress=False)
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-4)


def test_shard_latents_config_errors(store):
    with pytest.raises(InterplabError, match="--shard-latents trains topk SAEs \\(got --arch batchtopk\\)"):
        TrainConfig(store=store, arch="batchtopk", shard_latents=True).validate()
    with pytest.raises(InterplabError, match="without --resample-every"):
        TrainConfig(store=store, shard_latents=True, resample_every=100).validate()


def test_a_sharded_checkpoint_refuses_another_number_of_ranks(store, tmp_path):
    cfg = config(store, tmp_path / "run", checkpoint_every=10, tokens=20 * 256)

    class Stop(Exception):
        pass

    def stop(trainer) -> None:
        if trainer.step == 10:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, progress=False, callback=stop)
    ckpt = load_checkpoint(cfg.out)
    assert ckpt["latent_shards"] == 1
    ckpt["latent_shards"] = 2  # as if two ranks had written it
    ckpt["runs"] = {name: [state, state] for name, state in ckpt["runs"].items()}
    save_checkpoint(cfg.out, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    cfg.resume = True
    with pytest.raises(InterplabError, match="split over 2 rank\\(s\\), this run splits them over 1"):
        train(cfg, progress=False)
    assert torch.load(Path(cfg.out) / "checkpoint.pt", weights_only=True)["step"] == 10  # untouched
