"""Activation stores and SAE runs on S3, against moto's S3 server on 127.0.0.1.

Credentials and the endpoint come only from the standard environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL), as they would for a real bucket, MinIO or R2: no
code below passes any of them to s3fs or to interplab.
"""

from __future__ import annotations

import json
import logging
import socket

import pytest
import torch

from interplab.activations import ActivationStore, StoreWriter
from interplab.activations.store import CorruptShardError
from interplab.cli import main
from interplab.errors import InterplabError
from interplab.sae.files import load_sae
from interplab.sae.train_config import TrainConfig
from interplab.sae.trainer import train

BUCKET = "interplab-test"
HOOK = "blocks.0.hook_resid_post"
CTX_LEN, D = 8, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket():
    """An empty bucket on a local moto server; yields the s3fs filesystem (built from the environment alone)."""
    s3fs = pytest.importorskip("s3fs", reason="s3:// stores need s3fs: pip install 'interplab[s3]'")
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests run moto's server: pip install "
                                                            "'moto[server]' (in interplab's dev extra)")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request would bury any failure
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):  # the developer's own setup
                env.delenv(name, raising=False)
            env.setenv("AWS_ACCESS_KEY_ID", "interplab-test-key")
            env.setenv("AWS_SECRET_ACCESS_KEY", "interplab-test-secret")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # botocore >= 1.31 reads it, for every client
            s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems; none may predate these variables
            fs = s3fs.S3FileSystem()
            fs.mkdir(BUCKET)
            yield fs
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


def activations(n_contexts: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_contexts, CTX_LEN, D, generator=gen) * (torch.rand(n_contexts, CTX_LEN, D, generator=gen) < 0.2)
    tokens = torch.randint(0, 100, (n_contexts, CTX_LEN), generator=gen)
    return x, tokens


def writer(url: str, *, resume: bool = False) -> StoreWriter:
    return StoreWriter(url, config={"model": "synthetic"}, hooks=[HOOK], shapes={HOOK: (CTX_LEN, D)},
                       contexts_per_shard=4, resume=resume)


def test_a_store_written_to_s3_reads_back_exactly_and_is_sha256_checked(bucket):
    url = f"s3://{BUCKET}/round-trip"
    x, tokens = activations(10)
    with writer(url) as w:
        w.add({HOOK: x[:6]}, tokens[:6])
        w.add({HOOK: x[6:]}, tokens[6:])
        w.finish()
    names = sorted(p.rsplit("/", 1)[1] for p in bucket.ls(f"{BUCKET}/round-trip", refresh=True))
    assert names == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors",
                     "shard-00002.safetensors"]  # no temporary object left behind

    store = ActivationStore(url)
    assert store.complete and store.n_contexts == 10 and [s.n_contexts for s in store.shards] == [4, 4, 2]
    assert torch.equal(torch.cat([store.load_shard(i)[HOOK] for i in range(3)]), x)
    assert torch.equal(torch.cat([store.load_shard(i)["tokens"] for i in range(3)]), tokens.int())
    assert torch.equal(torch.cat(list(store.iter_batches(HOOK, 24, shuffle=False))), x.flatten(0, 1))

    shard = f"{BUCKET}/round-trip/shard-00001.safetensors"
    data = bucket.cat_file(shard)
    bucket.pipe_file(shard, data[:-1] + bytes([data[-1] ^ 1]))  # one bit of one activation, same size
    with pytest.raises(CorruptShardError, match=rf"shard-00001.safetensors in {url} is corrupt: expected sha256"):
        ActivationStore(url).load_shard(1)


def test_a_partial_store_on_s3_resumes_to_the_bytes_of_an_uninterrupted_one(bucket, tmp_path):
    x, tokens = activations(12, seed=1)
    with writer(str(tmp_path / "whole")) as w:
        w.add({HOOK: x}, tokens)
        w.finish()

    url = f"s3://{BUCKET}/resumed"
    with writer(url) as w:  # killed after 6 contexts: one durable shard of 4, two contexts lost with the buffer
        w.add({HOOK: x[:3]}, tokens[:3])
        w.add({HOOK: x[3:6]}, tokens[3:6])
    with pytest.raises(InterplabError, match=r"holds a partial store \(4 contexts durable, not complete\)"):
        writer(url)
    with writer(url, resume=True) as w:
        assert w.n_contexts == 4
        for i in range(w.n_contexts, 12, 3):
            w.add({HOOK: x[i:i + 3]}, tokens[i:i + 3])
        w.finish()

    local = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()
             if p.name != "manifest.json" and not p.name.startswith(".lock")}  # object stores have no lock
    remote = {p.rsplit("/", 1)[1]: bucket.cat_file(p) for p in bucket.ls(f"{BUCKET}/resumed", refresh=True)
              if not p.endswith("manifest.json")}
    assert remote == local and len(local) == 3

    def identity(manifest: dict) -> dict:
        return {k: v for k, v in manifest.items() if k != "created"}
    assert identity(json.loads(bucket.cat_file(f"{BUCKET}/resumed/manifest.json"))) == \
        identity(json.loads((tmp_path / "whole" / "manifest.json").read_text()))


def stop_at(step: int):
    def callback(trainer) -> None:
        if trainer.step == step:
            raise KeyboardInterrupt
    return callback


def test_sae_training_on_s3_checkpoints_resumes_and_saves_there(bucket, tmp_path):
    store = f"s3://{BUCKET}/sae-store"
    x, tokens = activations(32, seed=2)
    with writer(store) as w:
        w.add({HOOK: x}, tokens)
        w.finish()

    def config(out: str, **kw) -> TrainConfig:
        return TrainConfig(store=store, arch="topk", k=[2], expansion=[2], tokens=1024, batch_size=64, lr=1e-2,
                           log_every=4, checkpoint_every=3, out=out, device="cpu", **kw)

    whole = train(config(str(tmp_path / "whole")), progress=False)  # reads S3, writes locally: the reference
    out = f"s3://{BUCKET}/sae"
    with pytest.raises(KeyboardInterrupt):
        train(config(out), callback=stop_at(8), progress=False)
    assert sorted(p.rsplit("/", 1)[1] for p in bucket.ls(f"{BUCKET}/sae", refresh=True)) == [
        "checkpoint.pt", "train_config.json"]
    with pytest.raises(InterplabError, match=r"holds a partial run \(checkpoint at step 6\); pass --resume"):
        train(config(out), progress=False)

    resumed = train(config(out, resume=True), progress=False)
    assert resumed.resumed_from == 6 and resumed.steps == whole.steps == 16
    name = "topk-k2-x2"
    saved = load_sae(f"{out}/{name}")
    reference = load_sae(str(tmp_path / "whole" / name))
    for key, value in reference.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
    assert not bucket.exists(f"{BUCKET}/sae/checkpoint.pt")  # a finished run drops its checkpoint
    summary = json.loads(bucket.cat_file(f"{BUCKET}/sae/metrics.json"))
    assert summary["complete"] and summary["saes"][name]["fvu"] == whole.metrics[name]["fvu"]


def test_missing_credentials_fail_without_falling_back_to_anything_else(bucket, monkeypatch, tmp_path, capsys):
    """With the key variables unset (and no ~/.aws files), botocore finds no credentials: the environment is the
    only source the tests above used."""
    import s3fs
    from botocore.exceptions import NoCredentialsError

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials or ~/.aws/config
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(NoCredentialsError):
            ActivationStore(f"s3://{BUCKET}/round-trip")
        s3fs.S3FileSystem.clear_instance_cache()
        # The command line says what to set, in one line, instead of botocore's traceback.
        assert main(["inspect", "--store", f"s3://{BUCKET}/round-trip"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Unable to locate credentials" in err and "AWS_ACCESS_KEY_ID" in err
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
