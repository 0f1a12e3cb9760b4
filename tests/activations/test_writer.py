"""StoreWriter: the on-disk layout, atomic and deterministic shards, interruption and resume, and input errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime
from pathlib import Path

import fsspec
import pytest
import torch
from known_contexts import CTX, HOOKS, SHAPES, make_contexts
from safetensors.torch import load_file

from interplab.activations import STORE_FORMAT, CorruptShardError, StoreWriter
from interplab.errors import InterplabError

CONFIG = {"model": "toy-2l", "corpus": "pydocs", "seed": 0, "n_tokens": 40}


def feed(writer: StoreWriter, acts: dict[str, torch.Tensor], tokens: torch.Tensor, start: int, stop: int,
         batch: int = 2) -> None:
    for i in range(start, stop, batch):
        j = min(i + batch, stop)
        writer.add({hook: x[i:j] for hook, x in acts.items()}, tokens[i:j])


def write_store(url: str | Path, n: int = 10, contexts_per_shard: int = 4, batch: int = 2, dtype: str = "float32",
                config: dict = CONFIG) -> None:
    acts, tokens = make_contexts(n)
    with StoreWriter(str(url), config=config, hooks=HOOKS, shapes=SHAPES, dtype=dtype,
                     contexts_per_shard=contexts_per_shard) as writer:
        feed(writer, acts, tokens, 0, n, batch)
        writer.finish()


def write_interrupted(url: Path | str, exc: type[BaseException] = RuntimeError) -> None:
    """A run of 4 contexts per shard that dies after 2.5 shards' worth of adds (10 contexts)."""
    acts, tokens = make_contexts(16)
    with pytest.raises(exc):
        with StoreWriter(str(url), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4) as writer:
            feed(writer, acts, tokens, 0, 10)  # 2 full shards + 2 buffered contexts
            raise exc("killed mid-harvest")


def files(url: Path) -> dict[str, bytes]:
    """The store's files, without the lock a local writer leaves (interplab.runs.folder_lock)."""
    return {p.name: p.read_bytes() for p in sorted(url.iterdir()) if not p.name.startswith(".lock")}


def manifest(url: Path) -> dict:
    return json.loads((url / "manifest.json").read_text())


def without_created(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "created"}


# ---- layout ----------------------------------------------------------------------------------------------------


def test_manifest_lists_each_shard_with_the_sha256_of_its_bytes(tmp_path: Path) -> None:
    write_store(tmp_path, n=10, contexts_per_shard=4)
    m = manifest(tmp_path)
    assert sorted(files(tmp_path)) == ["manifest.json", *(f"shard-{i:05d}.safetensors" for i in range(3))]
    assert m["format"] == STORE_FORMAT == "interplab.activations" and m["version"] == 1
    assert m["config"] == CONFIG and m["hooks"] == HOOKS and m["dtype"] == "float32"
    assert m["shapes"] == {HOOKS[0]: [CTX, 6], HOOKS[1]: [CTX, 3]}
    assert (m["ctx_len"], m["n_contexts"], m["n_tokens"], m["complete"]) == (CTX, 10, 40, True)
    assert [s["n_contexts"] for s in m["shards"]] == [4, 4, 2]
    for s in m["shards"]:
        data = (tmp_path / s["file"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
        assert s["bytes"] == len(data)
    datetime.fromisoformat(m["created"])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shard_holds_each_hook_and_int32_tokens_row_aligned(tmp_path: Path, dtype: str) -> None:
    write_store(tmp_path, n=10, contexts_per_shard=4, dtype=dtype)
    acts, tokens = make_contexts(10)
    shard = load_file(tmp_path / "shard-00001.safetensors")
    assert sorted(shard) == sorted([*HOOKS, "tokens"])
    assert shard["tokens"].dtype == torch.int32 and torch.equal(shard["tokens"], tokens[4:8].int())
    for hook in HOOKS:
        assert shard[hook].dtype == getattr(torch, dtype)
        assert torch.equal(shard[hook], acts[hook][4:8].to(getattr(torch, dtype)))
        # Row r of the flattened view is the activation at token tokens.flatten()[r].
        assert torch.equal(shard[hook].flatten(0, 1)[:, 0].long(), shard["tokens"].flatten().long())


def test_manifest_lists_only_written_shards_until_finish(tmp_path: Path) -> None:
    acts, tokens = make_contexts(10)
    writer = StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4)
    assert manifest(tmp_path)["shards"] == [] and writer.n_contexts == 0
    feed(writer, acts, tokens, 0, 10)
    m = manifest(tmp_path)
    assert (len(m["shards"]), m["n_contexts"], m["complete"], writer.n_contexts) == (2, 8, False, 8)
    writer.finish()
    m = manifest(tmp_path)
    assert (len(m["shards"]), m["n_contexts"], m["complete"], writer.complete) == (3, 10, True, True)


def test_shards_depend_only_on_the_contexts_not_on_batching(tmp_path: Path) -> None:
    for batch in (2, 3, 10):
        write_store(tmp_path / f"batch{batch}", n=10, contexts_per_shard=4, batch=batch)
    reference = files(tmp_path / "batch2")
    for batch in (3, 10):
        other = files(tmp_path / f"batch{batch}")
        assert {k: v for k, v in other.items() if k != "manifest.json"} == {
            k: v for k, v in reference.items() if k != "manifest.json"}
        assert without_created(manifest(tmp_path / f"batch{batch}")) == without_created(manifest(tmp_path / "batch2"))


def test_add_copies_its_inputs(tmp_path: Path) -> None:
    acts, tokens = make_contexts(2)
    expected = {hook: x.clone() for hook, x in acts.items()}
    with StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4) as writer:
        writer.add(acts, tokens)
        for x in acts.values():
            x.zero_()  # a harvest loop reusing its buffer must not change what was added
        writer.finish()
    shard = load_file(tmp_path / "shard-00000.safetensors")
    assert all(torch.equal(shard[hook], expected[hook]) for hook in HOOKS)


# ---- interruption and resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interruption_keeps_only_durable_shards(tmp_path: Path, exc: type[BaseException]) -> None:
    write_interrupted(tmp_path, exc)
    assert sorted(files(tmp_path)) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    m = manifest(tmp_path)
    assert (len(m["shards"]), m["n_contexts"], m["complete"]) == (2, 8, False)


def test_resume_ends_byte_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    write_store(tmp_path / "reference", n=16, contexts_per_shard=4)
    write_interrupted(tmp_path / "resumed")
    created = manifest(tmp_path / "resumed")["created"]

    acts, tokens = make_contexts(16)
    with StoreWriter(str(tmp_path / "resumed"), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4,
                     resume=True) as writer:
        assert (writer.n_contexts, writer.complete) == (8, False)
        feed(writer, acts, tokens, writer.n_contexts, 16)
        writer.finish()

    resumed, reference = files(tmp_path / "resumed"), files(tmp_path / "reference")
    assert sorted(resumed) == sorted(reference)
    assert all(resumed[name] == reference[name] for name in reference if name != "manifest.json")
    assert without_created(manifest(tmp_path / "resumed")) == without_created(manifest(tmp_path / "reference"))
    assert manifest(tmp_path / "resumed")["created"] == created  # the store keeps its birth date


def test_resume_deletes_what_a_kill_mid_write_left_behind(tmp_path: Path) -> None:
    write_store(tmp_path / "reference", n=16, contexts_per_shard=4)
    store = tmp_path / "resumed"
    write_interrupted(store)
    # A kill after shard 2 was moved into place but before the manifest listed it, and during later tmp writes.
    (store / "shard-00002.safetensors").write_bytes(b"from the killed run")
    (store / "shard-00003.safetensors.tmp-xyz").write_bytes(b"half a shard")
    (store / "manifest.json.tmp-abc").write_bytes(b"{half a manifest")

    acts, tokens = make_contexts(16)
    writer = StoreWriter(str(store), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4, resume=True)
    assert sorted(files(store)) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    feed(writer, acts, tokens, writer.n_contexts, 16)
    writer.finish()
    assert files(store).keys() == files(tmp_path / "reference").keys()
    assert all(files(store)[k] == v for k, v in files(tmp_path / "reference").items() if k != "manifest.json")


def test_interrupt_and_resume_on_a_memory_url(tmp_path: Path) -> None:
    write_store(tmp_path / "reference", n=16, contexts_per_shard=4)
    url = f"memory://interplab-test-{uuid.uuid4().hex}/store"
    fs = fsspec.filesystem("memory")
    try:
        write_interrupted(url)
        durable = ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
        assert sorted(path.rsplit("/", 1)[1] for path in fs.ls(url, detail=False)) == durable
        acts, tokens = make_contexts(16)
        writer = StoreWriter(url, config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4, resume=True)
        feed(writer, acts, tokens, writer.n_contexts, 16)
        writer.finish()
        for name, data in files(tmp_path / "reference").items():
            if name != "manifest.json":
                assert fs.cat_file(f"{url}/{name}") == data
    finally:
        fs.store.clear()  # the memory filesystem is process-wide
        fs.pseudo_dirs.clear()
        fs.pseudo_dirs.append("")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_rejects_a_damaged_listed_shard(tmp_path: Path, damage: str) -> None:
    write_interrupted(tmp_path)
    shard = tmp_path / "shard-00001.safetensors"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    else:
        shard.unlink()
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors"):
        StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4, resume=True)


def test_partial_store_without_resume_is_an_error(tmp_path: Path) -> None:
    write_interrupted(tmp_path)
    with pytest.raises(InterplabError, match="partial store.*--resume"):
        StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4)


@pytest.mark.parametrize("resume", [False, True])
def test_complete_store_reopens_complete_and_refuses_more(tmp_path: Path, resume: bool) -> None:
    write_store(tmp_path, n=10)
    before = files(tmp_path)
    writer = StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4,
                         resume=resume)
    assert (writer.complete, writer.n_contexts) == (True, 10)
    acts, tokens = make_contexts(2)
    with pytest.raises(InterplabError, match="already holds a complete store"):
        writer.add(acts, tokens)
    writer.finish()  # a no-op, not a second final shard
    assert files(tmp_path) == before


# ---- opening errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, differs",
    [
        ({"config": {**CONFIG, "corpus": "wikitext", "seed": 1}}, "differs in: corpus, seed"),
        ({"config": {**CONFIG, "extra": True}}, "differs in: extra"),
        ({"dtype": "bfloat16"}, "differs in: dtype"),
        ({"shapes": {**SHAPES, HOOKS[1]: (CTX, 4)}}, "differs in: shapes"),
        ({"hooks": HOOKS[::-1]}, "differs in: hooks"),
        ({"contexts_per_shard": 8}, "differs in: contexts_per_shard"),
        # as harvest writes it: in the config and in the manifest, named once
        ({"config": {**CONFIG, "contexts_per_shard": 8}, "contexts_per_shard": 8}, "differs in: contexts_per_shard"),
    ],
)
def test_a_different_store_in_the_directory_is_an_error(tmp_path: Path, change: dict, differs: str) -> None:
    write_store(tmp_path, n=10)
    before = files(tmp_path)
    kwargs = dict(config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4) | change
    with pytest.raises(InterplabError, match=f"holds a different store \\({differs}\\); choose another --out"):
        StoreWriter(str(tmp_path), resume=True, **kwargs)
    assert files(tmp_path) == before


def test_config_is_compared_as_json(tmp_path: Path) -> None:
    """A tuple in the config comes back from manifest.json as a list; that is the same store."""
    config = {**CONFIG, "hooks": ("a", "b")}
    write_store(tmp_path, n=4, config=config)
    assert StoreWriter(str(tmp_path), config=config, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4).complete


def test_a_foreign_non_empty_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InterplabError, match="is not empty and holds no interplab store"):
        StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES, resume=True)
    assert files(tmp_path) == {"notes.txt": b"mine"}


def test_new_store_in_a_missing_or_empty_directory(tmp_path: Path) -> None:
    StoreWriter(str(tmp_path / "a" / "b"), config=CONFIG, hooks=HOOKS, shapes=SHAPES)
    assert manifest(tmp_path / "a" / "b")["n_contexts"] == 0
    (tmp_path / "empty").mkdir()
    StoreWriter(str(tmp_path / "empty"), config=CONFIG, hooks=HOOKS, shapes=SHAPES)
    # Killed while writing the very first manifest: only our tmp file is there, which is not "foreign".
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "manifest.json.tmp-0f").write_text("{")
    StoreWriter(str(tmp_path / "killed"), config=CONFIG, hooks=HOOKS, shapes=SHAPES)
    assert sorted(files(tmp_path / "killed")) == ["manifest.json"]


# ---- input errors ----------------------------------------------------------------------------------------------

H0, H1 = HOOKS


@pytest.mark.parametrize(
    "acts_shapes, tokens_shape, message",
    [
        ({H0: (2, 4, 6)}, (2, 4), "missing ['blocks.1.hook_mlp_out']"),
        ({H0: (2, 4, 6), H1: (2, 4, 3), "blocks.2.hook_resid_post": (2, 4, 6)}, (2, 4),
         "unexpected ['blocks.2.hook_resid_post']"),
        ({H0: (2, 4, 5), H1: (2, 4, 3)}, (2, 4), f"acts['{H0}'] has shape (2, 4, 5); expected (2, 4, 6)"),
        ({H0: (2, 4, 6), H1: (2, 3, 3)}, (2, 4), f"acts['{H1}'] has shape (2, 3, 3); expected (2, 4, 3)"),
        ({H0: (2, 4, 6), H1: (3, 4, 3)}, (2, 4), f"acts['{H1}'] has shape (3, 4, 3); expected (2, 4, 3)"),
        ({H0: (2, 4, 6), H1: (2, 4, 3)}, (2, 5), "tokens has shape (2, 5); expected (batch, ctx_len=4)"),
        ({H0: (2, 4, 6), H1: (2, 4, 3)}, (8,), "tokens has shape (8,); expected (batch, ctx_len=4)"),
    ],
)
def test_add_rejects_a_bad_batch_and_buffers_nothing(tmp_path: Path, acts_shapes: dict, tokens_shape: tuple,
                                                     message: str) -> None:
    writer = StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4)
    bad = {hook: torch.zeros(shape) for hook, shape in acts_shapes.items()}
    with pytest.raises(InterplabError) as err:
        writer.add(bad, torch.zeros(tokens_shape, dtype=torch.long))
    assert message in str(err.value) and "\n" not in str(err.value)
    # The writer is still usable and the rejected batch left no trace.
    acts, tokens = make_contexts(2)
    writer.add(acts, tokens)
    writer.finish()
    assert torch.equal(load_file(tmp_path / "shard-00000.safetensors")["tokens"], tokens.int())


def test_add_rejects_float_tokens(tmp_path: Path) -> None:
    writer = StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES)
    acts, tokens = make_contexts(2)
    with pytest.raises(InterplabError, match="tokens has dtype torch.float32; expected integer token ids"):
        writer.add(acts, tokens.float())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dtype": "int8"}, "dtype 'int8' is not supported; valid: float32, float16, bfloat16"),
        ({"shapes": {H0: (4, 6)}}, "expected one (ctx_len, d) per hook"),
        ({"shapes": {H0: (4, 6), H1: (5, 3)}}, "hooks disagree on ctx_len ([4, 5])"),
        ({"shapes": {H0: (4, 6), H1: (4,)}}, f"shapes['{H1}'] is (4,); expected (ctx_len, d)"),
        ({"hooks": [H0, "tokens"], "shapes": {H0: (4, 6), "tokens": (4, 1)}}, "not including 'tokens'"),
        ({"contexts_per_shard": 0}, "contexts_per_shard is 0; expected an int >= 1"),
        ({"config": {"model": object()}}, "must be JSON-serialisable"),
    ],
)
def test_constructor_rejects_bad_arguments(tmp_path: Path, change: dict, message: str) -> None:
    kwargs = dict(config=CONFIG, hooks=HOOKS, shapes=SHAPES) | change
    with pytest.raises(InterplabError) as err:
        StoreWriter(str(tmp_path / "store"), **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "store").exists()


def test_writer_closed_by_an_error_refuses_more(tmp_path: Path) -> None:
    acts, tokens = make_contexts(2)
    with pytest.raises(RuntimeError):
        with StoreWriter(str(tmp_path), config=CONFIG, hooks=HOOKS, shapes=SHAPES) as writer:
            raise RuntimeError
    with pytest.raises(InterplabError, match="resume=True"):
        writer.add(acts, tokens)


# ---- a real kill -----------------------------------------------------------------------------------------------

CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_writer import CONFIG, HOOKS, SHAPES, make_contexts
from interplab.activations import StoreWriter
acts, tokens = make_contexts(40)
writer = StoreWriter({url!r}, config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4)
for i in range(0, 40, 2):
    writer.add({{h: x[i:i + 2] for h, x in acts.items()}}, tokens[i:i + 2])
    time.sleep(0.05)
time.sleep(60)  # never finishes: the parent kills it
"""


@pytest.mark.slow
def test_sigkill_mid_harvest_then_resume(tmp_path: Path) -> None:
    write_store(tmp_path / "reference", n=40, contexts_per_shard=4)
    store = tmp_path / "killed"
    script = CHILD.format(tests=str(Path(__file__).parent), url=str(store))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    try:
        deadline = time.monotonic() + 60
        while not ((store / "manifest.json").exists() and manifest(store)["n_contexts"] >= 8):
            assert time.monotonic() < deadline and child.poll() is None, "child never wrote two shards"
            time.sleep(0.01)
    finally:
        child.kill()  # SIGKILL on POSIX: no __exit__, no cleanup
        child.wait()

    acts, tokens = make_contexts(40)
    writer = StoreWriter(str(store), config=CONFIG, hooks=HOOKS, shapes=SHAPES, contexts_per_shard=4, resume=True)
    assert 8 <= writer.n_contexts < 40
    feed(writer, acts, tokens, writer.n_contexts, 40)
    writer.finish()
    reference = files(tmp_path / "reference")
    assert files(store).keys() == reference.keys()
    assert all(files(store)[k] == v for k, v in reference.items() if k != "manifest.json")
    assert without_created(manifest(store)) == without_created(manifest(tmp_path / "reference"))
    assert not any(name.endswith(".tmp") or ".tmp-" in name for name in os.listdir(store))
