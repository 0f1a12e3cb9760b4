"""The store side of a torchrun harvest: which contexts a rank owns, the checks of the output folder, the merge.

With W ranks and shards of `cps` contexts, global context i belongs to global shard s = i // cps, and shard s is
harvested by rank s % W. Rank r writes its shards as an ordinary store in OUT/rank-0000r/ (whose config adds
`rank` and `world_size`), so its local shard j is global shard j * W + r, and resuming a rank is resuming a store.
When every rank has finished, rank 0 writes OUT/manifest.json listing all shards in global order: a reader sees
exactly the store a single process would have written with the same settings, shard for shard and byte for byte.

    OUT/manifest.json                          the merged store (written last, complete)
    OUT/rank-00000/manifest.json               rank 0's own store: global shards 0, W, 2W, ...
    OUT/rank-00000/shard-00000.safetensors
    OUT/rank-00001/...                         rank 1: global shards 1, W + 1, ...
"""

from __future__ import annotations

import itertools
import posixpath
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

from fsspec import AbstractFileSystem
from jaxtyping import Int
from torch import Tensor

from interplab import distributed as D
from interplab.activations.store import (
    RANK_DIR_RE,
    TMP_RE,
    CorruptShardError,
    ShardInfo,
    rank_dir,
    read_manifest,
)
from interplab.activations.writer import IDENTITY_FIELDS, write_manifest
from interplab.errors import InterplabError
from interplab.fileio import join, list_files, open_url
from interplab.runs import JSONDict

RANK_KEYS = ("rank", "world_size")
"""Config entries a rank's store adds to the harvest's own identity."""

T = TypeVar("T")
P = ParamSpec("P")


def rank_url(out: str, rank: int) -> str:
    """Where rank `rank` of a torchrun harvest into `out` writes its own store."""
    return join(out, rank_dir(rank))


# ---- which contexts a rank harvests ---------------------------------------------------------------------------

def own_contexts(
    contexts: Iterator[Int[Tensor, " ctx_len"]], cps: int, r: D.Ranks, done: int, stop: int
) -> Iterator[Int[Tensor, " ctx_len"]]:
    """The contexts of rank r's shards among global contexts [0, stop), after the `done` it already holds.

    `done` is a whole number of shards (a store only holds full shards until it is finished), so its next shard
    is local shard done // cps, global shard (done // cps) * W + r. The stream before it, and the other ranks'
    contexts, are still tokenised and thrown away: every rank walks the same deterministic stream.
    """
    start = (done // cps * r.world_size + r.rank) * cps
    for i, context in enumerate(itertools.islice(contexts, start, stop), start):
        if i // cps % r.world_size == r.rank:
            yield context


def share(n_contexts: int, cps: int, r: D.Ranks) -> int:
    """How many of the first `n_contexts` global contexts rank r harvests (its progress bar's total)."""
    n_shards = -(-n_contexts // cps)
    return sum(min(cps, n_contexts - s * cps) for s in range(r.rank, n_shards, r.world_size))


# ---- checks of the output folder ------------------------------------------------------------------------------

def _listing(fs: AbstractFileSystem, root: str) -> tuple[list[str], list[str]]:
    """Names of the files and of the folders directly inside `root` (none if it does not exist)."""
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return [], []
    entries = fs.ls(root, detail=True)
    names = [(posixpath.basename(e["name"].rstrip("/")), e["type"]) for e in entries]
    return sorted(n for n, kind in names if kind == "file"), sorted(n for n, kind in names if kind == "directory")


def _rank_manifests(out: str) -> dict[str, JSONDict | None]:
    """The rank folders in `out` and their manifests (None for a folder a rank created but never wrote to)."""
    fs, root = open_url(out)
    return {name: read_manifest(join(out, name)) for name in _listing(fs, root)[1] if RANK_DIR_RE.fullmatch(name)}


def _world_sizes(manifests: dict[str, JSONDict | None]) -> list[int]:
    """The world sizes the rank stores record (several only if someone mixed folders of different jobs)."""
    sizes = {m["config"].get("world_size") for m in manifests.values() if m is not None}
    return sorted(s for s in sizes if isinstance(s, int))


def refuse_ranked_in_progress(out: str) -> None:
    """A single-process harvest must not start a second store beside a torchrun harvest that is not merged yet."""
    if read_manifest(out) is not None:
        return  # a merged (complete) torchrun store is an ordinary store
    manifests = _rank_manifests(out)
    if manifests:
        n = "/".join(map(str, _world_sizes(manifests))) or "N"
        raise InterplabError(
            f"{out} is a torchrun harvest in progress ({', '.join(manifests)}, no merged manifest.json): resume "
            f"it with torchrun --nproc_per_node {n} -m interplab harvest ... --resume, or delete it to start over"
        )


def check_ranked_out(out: str, world_size: int, resume: bool) -> JSONDict | None:
    """The merged manifest if `out` holds a complete store, None if a torchrun harvest of `world_size` ranks can
    go on in `out`; an InterplabError if `out` holds something else. Reads only, so every rank can call it."""
    top = read_manifest(out)
    if top is not None:
        if not top["complete"]:
            raise InterplabError(
                f"{out} holds a partial single-process harvest ({top['n_contexts']} contexts durable): resume it "
                "without torchrun (interplab harvest ... --resume), or delete it to start over"
            )
        return top
    fs, root = open_url(out)
    files, folders = _listing(fs, root)
    foreign = [f for f in files if not TMP_RE.fullmatch(f)] + [f"{d}/" for d in folders if not RANK_DIR_RE.fullmatch(d)]
    if foreign:
        raise InterplabError(f"{out} is not empty and holds no interplab store (found {', '.join(foreign[:3])}); "
                             "choose a new or empty directory")
    manifests = _rank_manifests(out)
    sizes = _world_sizes(manifests)
    too_high = any(int(name.removeprefix("rank-")) >= world_size for name in manifests)
    if (sizes and sizes != [world_size]) or too_high:
        n = "/".join(map(str, sizes)) or "more"
        raise InterplabError(
            f"{out} is a torchrun harvest by {n} processes in progress, and this job has {world_size}: resume it "
            f"with torchrun --nproc_per_node {n} -m interplab harvest ... --resume, or delete it to start over"
        )
    partial = [name for name, m in manifests.items() if m is not None and not m["complete"]]
    if partial and not resume:
        raise InterplabError(f"{out} is a torchrun harvest in progress ({', '.join(partial)} not complete); pass "
                             "--resume to continue it, or delete it to start over")
    return None


# ---- the merge --------------------------------------------------------------------------------------------------

def merge_rank_stores(out: str, world_size: int, identity: JSONDict) -> int:
    """Write `out`/manifest.json listing every rank's shards in global order; return the number of contexts.

    `identity` is rank 0's store identity; rank r's must be the same apart from config["rank"] = r. Each rank's
    shards must fill its slots of the global order (global shard g = local shard g // W of rank g % W), every
    shard but the last holding a full `contexts_per_shard`, and each listed file must be in place at its size.
    """
    fs, root = open_url(out)
    per_rank = [_finished_rank(out, fs, root, r, world_size, identity) for r in range(world_size)]
    n_shards = sum(len(shards) for shards in per_rank)
    merged: list[ShardInfo] = []
    for g in range(n_shards):
        r, j = g % world_size, g // world_size
        if j >= len(per_rank[r]):
            counts = ", ".join(f"rank {i}: {len(s)}" for i, s in enumerate(per_rank))
            raise InterplabError(f"the rank stores in {out} do not fit together (shards per rank: {counts}; global "
                                 f"shard {g} would be rank {r}'s shard {j}); delete {out} and harvest again")
        s = per_rank[r][j]
        if g < n_shards - 1 and s.n_contexts != identity["contexts_per_shard"]:
            raise InterplabError(f"{rank_dir(r)}/{s.file} in {out} holds {s.n_contexts} contexts, but only the last "
                                 f"shard may hold fewer than {identity['contexts_per_shard']}; delete {out} and "
                                 "harvest again")
        merged.append(s._replace(file=f"{rank_dir(r)}/{s.file}"))
    top = {**identity, "config": {k: v for k, v in identity["config"].items() if k not in RANK_KEYS}}
    created = read_manifest(rank_url(out, 0))["created"]
    write_manifest(fs, root, top, merged, complete=True, created=created)
    return sum(s.n_contexts for s in merged)


def _finished_rank(
    out: str, fs: AbstractFileSystem, root: str, r: int, world_size: int, identity: JSONDict
) -> list[ShardInfo]:
    """Rank r's shards, after checking its store is complete, of this harvest, and its files in place."""
    url = rank_url(out, r)
    m = read_manifest(url)
    if m is None or not m["complete"]:
        state = "no manifest.json" if m is None else "an incomplete store"
        raise InterplabError(f"{url} holds {state} after every rank finished; rerun the same torchrun command with "
                             "--resume")
    expected = {**identity, "config": {**identity["config"], "rank": r, "world_size": world_size}}
    differs = [key for key in IDENTITY_FIELDS if m[key] != expected[key]]
    if differs:
        raise InterplabError(f"{url} holds a different store from rank 0's (differs in: {', '.join(differs)}); "
                             f"delete {out} and harvest again")
    files = list_files(fs, join(root, rank_dir(r)))
    shards = [ShardInfo(**s) for s in m["shards"]]
    for s in shards:
        if files.get(s.file) != s.bytes:
            found = "no file" if s.file not in files else f"{files[s.file]} bytes"
            raise CorruptShardError(f"{rank_dir(r)}/{s.file} in {out}: its rank's manifest lists {s.bytes} bytes, "
                                    f"found {found}; delete {out} and harvest again")
    return shards


# ---- collectives that keep every rank's outcome the same -------------------------------------------------------

def on_every_rank(fn: Callable[[], T]) -> T:
    """fn() on every rank; if it raises an InterplabError on any rank, every rank raises (the failing ranks their
    own error, the others the first failing rank's message), instead of the others waiting for a rank that has
    gone."""
    try:
        value, error = fn(), None
    except InterplabError as e:
        value, error = None, e
    messages = D.broadcast_object(D.gather_objects(None if error is None else str(error)))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages or []) if message is not None]
    if failed:
        rank, message = failed[0]
        raise InterplabError(f"rank {rank} of this torchrun job stopped: {message}")
    return value  # type: ignore[return-value]


def on_main(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """fn(*args, **kwargs) on rank 0, its result given to every rank (an InterplabError raised there is raised on every
    rank). The broadcast is also a barrier: no rank returns before rank 0 is done."""
    outcome: tuple[bool, T | str | None] = (True, None)
    error: InterplabError | None = None
    if D.ranks().is_main:
        try:
            outcome = (True, fn(*args, **kwargs))
        except InterplabError as e:
            outcome, error = (False, str(e)), e
    ok, value = D.broadcast_object(outcome)
    if error is not None:
        raise error
    if not ok:
        raise InterplabError(value)
    return value
