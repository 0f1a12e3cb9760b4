"""ActivationStore: exact round trips, streaming batches (each row once, seeded, bounded memory), and corruption."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Iterator

import fsspec
import pytest
import torch
from known_contexts import CTX, HOOKS, SHAPES, make_contexts

from interplab.activations import ActivationStore, CorruptShardError, StoreWriter
from interplab.errors import InterplabError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_store(url: str, n: int, contexts_per_shard: int, dtype: str = "float32", finish: bool = True
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Write n contexts two at a time; return what was written, cast to the store dtype."""
    acts, tokens = make_contexts(n)
    writer = StoreWriter(url, config={"test": "store"}, hooks=HOOKS, shapes=SHAPES, dtype=dtype,
                         contexts_per_shard=contexts_per_shard)
    for i in range(0, n, 2):
        writer.add({hook: x[i:i + 2] for hook, x in acts.items()}, tokens[i:i + 2])
    if finish:
        writer.finish()
    return {hook: x.to(DTYPES[dtype]) for hook, x in acts.items()}, tokens


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://interplab-test-{uuid.uuid4().hex}/store"
    yield url
    fs = fsspec.filesystem("memory")  # one process-wide store: empty it so tests cannot see each other's files
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


@pytest.fixture(params=["local", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("memory_url")


def rows_of(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (acts, tokens) batches, checking each row kept its own token id."""
    if not batches:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int32)
    acts = torch.cat([a for a, _ in batches])
    tokens = torch.cat([t for _, t in batches])
    assert torch.equal(acts[:, 0].long(), tokens.long())
    return acts, tokens


# ---- round trip ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_is_exact(url: str, dtype: str) -> None:
    acts, tokens = write_store(url, n=10, contexts_per_shard=4, dtype=dtype)
    store = ActivationStore(url)
    assert (store.hooks, store.ctx_len, store.n_contexts, store.n_tokens, store.complete) == (HOOKS, CTX, 10, 40, True)
    assert (store.d(HOOKS[0]), store.d(HOOKS[1])) == (6, 3)
    assert [s.n_contexts for s in store.shards] == [4, 4, 2]

    shards = [store.load_shard(i) for i in range(3)]
    for hook in HOOKS:
        got = torch.cat([s[hook] for s in shards])
        assert got.dtype == DTYPES[dtype] and torch.equal(got, acts[hook])
    got_tokens = torch.cat([s["tokens"] for s in shards])
    assert got_tokens.dtype == torch.int32 and torch.equal(got_tokens, tokens.int())

    chunks = list(store.iter_contexts())  # one chunk of contexts per shard, in store order
    assert [len(c["tokens"]) for c in chunks] == [4, 4, 2]
    for hook in HOOKS:
        assert torch.equal(torch.cat([c[hook] for c in chunks]), acts[hook])
    assert torch.equal(torch.cat([c["tokens"] for c in chunks]), tokens.int())


def test_hooks_subset(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=4, contexts_per_shard=4)
    store = ActivationStore(str(tmp_path))
    assert sorted(store.load_shard(0, [HOOKS[1]])) == sorted([HOOKS[1], "tokens"])
    assert sorted(next(store.iter_contexts([HOOKS[0]]))) == sorted([HOOKS[0], "tokens"])


def test_partial_store_reads_its_durable_shards(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=10, contexts_per_shard=4, finish=False)
    store = ActivationStore(str(tmp_path))
    assert (store.complete, store.n_contexts, len(store.shards)) == (False, 8, 2)
    _, tokens = rows_of(list(store.iter_batches(HOOKS[0], 5, with_tokens=True)))
    assert sorted(tokens.tolist()) == list(range(8 * CTX))


# ---- iter_batches ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("batch_size", [1, 7, 40, 64])
@pytest.mark.parametrize("drop_last", [False, True])
def test_iter_batches_yields_every_row_once(tmp_path: Path, shuffle: bool, batch_size: int, drop_last: bool) -> None:
    write_store(str(tmp_path), n=10, contexts_per_shard=3)  # shards of 3, 3, 3, 1 contexts: 40 rows
    store = ActivationStore(str(tmp_path))
    batches = list(store.iter_batches(HOOKS[0], batch_size, shuffle=shuffle, buffer_shards=2, drop_last=drop_last,
                                      with_tokens=True))
    sizes = [len(a) for a, _ in batches]
    n_full, rest = divmod(40, batch_size)
    assert sizes == [batch_size] * n_full + ([rest] if rest and not drop_last else [])
    assert all(a.shape[1:] == (6,) for a, _ in batches)
    _, tokens = rows_of(batches)
    if drop_last:
        assert len(set(tokens.tolist())) == len(tokens) == n_full * batch_size
    elif shuffle:
        assert sorted(tokens.tolist()) == list(range(40)) and tokens.tolist() != list(range(40))
    else:
        assert tokens.tolist() == list(range(40))  # store order


def test_iter_batches_is_deterministic_per_seed(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=12, contexts_per_shard=2)
    store = ActivationStore(str(tmp_path))

    def order(seed: int) -> list[int]:
        return rows_of(list(store.iter_batches(HOOKS[1], 8, seed=seed, buffer_shards=2, with_tokens=True)))[1].tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(1)) == sorted(order(0))


def test_shuffle_mixes_rows_across_shards(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=16, contexts_per_shard=2)  # 8 shards of 8 rows
    store = ActivationStore(str(tmp_path))
    first = next(store.iter_batches(HOOKS[0], 16, buffer_shards=4))
    shards_seen = {int(row) // (2 * CTX) for row in first[:, 0]}
    assert len(shards_seen) > 2


def test_shard_order_is_shuffled(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=16, contexts_per_shard=2)  # 8 shards of 8 rows
    store = ActivationStore(str(tmp_path))
    # A one-shard buffer and one-shard batches: each batch is exactly one shard, so batches show the shard order.
    orders = []
    for seed in range(3):
        batches = list(store.iter_batches(HOOKS[0], 8, seed=seed, buffer_shards=1))
        shard_of_batch = [{int(row) // 8 for row in batch[:, 0]} for batch in batches]
        assert all(len(shards) == 1 for shards in shard_of_batch)
        orders.append([shards.pop() for shards in shard_of_batch])
    assert all(sorted(order) == list(range(8)) for order in orders)
    assert any(order != list(range(8)) for order in orders) and orders[0] != orders[1]


@pytest.mark.parametrize("shuffle", [True, False])
def test_memory_is_bounded_by_buffer_shards_not_store_size(tmp_path: Path, shuffle: bool) -> None:
    rows_per_shard = 2 * CTX
    peaks = []
    for n_contexts in (20, 80):  # 10 shards, then 40
        url = str(tmp_path / f"store{n_contexts}")
        write_store(url, n=n_contexts, contexts_per_shard=2)
        store = ActivationStore(url)
        batches = list(store.iter_batches(HOOKS[0], 5, shuffle=shuffle, buffer_shards=3, with_tokens=True))
        assert sorted(rows_of(batches)[1].tolist()) == list(range(n_contexts * CTX))
        assert rows_per_shard < store.max_buffered_rows <= 3 * rows_per_shard
        peaks.append(store.max_buffered_rows)
    assert peaks[0] == peaks[1]


def test_batch_larger_than_the_buffer_still_streams(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=40, contexts_per_shard=2)  # 20 shards of 8 rows
    store = ActivationStore(str(tmp_path))
    batches = list(store.iter_batches(HOOKS[0], 50, buffer_shards=1, with_tokens=True))
    assert [len(a) for a, _ in batches] == [50, 50, 50, 10]
    assert sorted(rows_of(batches)[1].tolist()) == list(range(160))
    assert store.max_buffered_rows <= 50 - 1 + 8


def test_iter_batches_output_dtype(tmp_path: Path) -> None:
    acts, _ = write_store(str(tmp_path), n=4, contexts_per_shard=4, dtype="bfloat16")
    store = ActivationStore(str(tmp_path))
    (batch,) = store.iter_batches(HOOKS[1], 16, shuffle=False, dtype=torch.float32)
    assert batch.dtype == torch.float32
    assert torch.equal(batch, acts[HOOKS[1]].flatten(0, 1).float())
    (native,) = store.iter_batches(HOOKS[1], 16, shuffle=False)
    assert native.dtype == torch.bfloat16


# ---- what the reader refuses and what it ignores ---------------------------------------------------------------


def test_flipped_byte_raises_corrupt_shard_error_naming_the_shard(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=10, contexts_per_shard=4)
    path = tmp_path / "shard-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expected = json.loads((tmp_path / "manifest.json").read_text())["shards"][1]["sha256"]

    store = ActivationStore(str(tmp_path))
    store.load_shard(0)  # the other shards are still fine
    with pytest.raises(CorruptShardError) as err:
        store.load_shard(1)
    message = str(err.value)
    assert "shard-00001.safetensors" in message and expected in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert isinstance(err.value, InterplabError)
    with pytest.raises(CorruptShardError, match="shard-00001.safetensors"):
        list(store.iter_batches(HOOKS[0], 4))


def test_missing_shard_raises_corrupt_shard_error(memory_url: str) -> None:
    write_store(memory_url, n=10, contexts_per_shard=4)
    fs = fsspec.filesystem("memory")
    fs.rm(memory_url + "/shard-00002.safetensors")
    with pytest.raises(CorruptShardError, match="shard-00002.safetensors .*missing"):
        list(ActivationStore(memory_url).iter_contexts())


def test_unlisted_and_half_written_files_are_ignored(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=12, contexts_per_shard=4)  # shards 0..2
    (tmp_path / "shard-00003.safetensors.tmp-xyz").write_bytes(b"half a shard")
    # A perfectly valid shard, but the manifest does not list it.
    (tmp_path / "shard-00009.safetensors").write_bytes((tmp_path / "shard-00000.safetensors").read_bytes())
    store = ActivationStore(str(tmp_path))
    assert (len(store.shards), store.n_contexts) == (3, 12)
    _, tokens = rows_of(list(store.iter_batches(HOOKS[0], 7, with_tokens=True)))
    assert sorted(tokens.tolist()) == list(range(12 * CTX))
    assert sum(len(c["tokens"]) for c in store.iter_contexts()) == 12


def test_unknown_hook_lists_the_stores_hooks(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=4, contexts_per_shard=4)
    store = ActivationStore(str(tmp_path))
    calls = [
        lambda: store.d("blocks.7.hook_resid_post"),
        lambda: store.load_shard(0, ["blocks.7.hook_resid_post"]),
        lambda: store.iter_batches("blocks.7.hook_resid_post", 4),  # raises on the call, before iterating
        lambda: store.iter_contexts(["blocks.7.hook_resid_post"]),
    ]
    for call in calls:
        with pytest.raises(InterplabError, match="unknown hook 'blocks.7.hook_resid_post'.*holds: "
                                                 "blocks.0.hook_resid_post, blocks.1.hook_mlp_out"):
            call()


def test_bad_arguments(tmp_path: Path) -> None:
    write_store(str(tmp_path), n=4, contexts_per_shard=4)
    store = ActivationStore(str(tmp_path))
    with pytest.raises(InterplabError, match="batch_size=0"):
        store.iter_batches(HOOKS[0], 0)
    with pytest.raises(InterplabError, match="buffer_shards=0"):
        store.iter_batches(HOOKS[0], 4, buffer_shards=0)
    with pytest.raises(InterplabError, match="shard index 1 is out of range; .* has 1 shards"):
        store.load_shard(1)


def test_missing_manifest(tmp_path: Path, memory_url: str) -> None:
    for url in (str(tmp_path / "nothing-here"), memory_url):
        with pytest.raises(InterplabError, match="holds no activation store"):
            ActivationStore(url)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: "{not json", "is not valid JSON"),
        (lambda m: {**m, "format": "something.else"}, "expected format 'interplab.activations'"),
        (lambda m: {**m, "version": 2}, "version 2 is not 1"),
        (lambda m: {k: v for k, v in m.items() if k != "shards"}, "field 'shards' is missing"),
        (lambda m: {**m, "n_tokens": 41}, "n_tokens is not n_contexts \\* ctx_len"),
        (lambda m: {**m, "n_contexts": 11}, "n_contexts is not the sum"),
        (lambda m: {**m, "dtype": "int8"}, "dtype 'int8'"),
        (lambda m: {**m, "shards": [{**m["shards"][0], "file": "../elsewhere.safetensors"}, *m["shards"][1:]]},
         "shard entry 0 is not"),
    ],
)
def test_invalid_manifest(tmp_path: Path, edit, message: str) -> None:
    write_store(str(tmp_path), n=10, contexts_per_shard=4)
    path = tmp_path / "manifest.json"
    edited = edit(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(InterplabError, match=message):
        ActivationStore(str(tmp_path))
