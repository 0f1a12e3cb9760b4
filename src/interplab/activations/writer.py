"""Writing an activation store shard by shard, so that a killed harvest loses at most one shard of work.

Contexts are buffered until `contexts_per_shard` of them are there; then the shard is written atomically and the
manifest, rewritten atomically after it, starts listing it. Shard bytes depend only on the sequence of contexts
(not on batch boundaries, not on the time), so a run killed after k shards and resumed from `n_contexts` ends
byte-identical to an uninterrupted one. Works on any fsspec URL; `s3://` needs `pip install s3fs`.

    with StoreWriter(out, config=cfg, hooks=hooks, shapes=shapes, resume=True) as writer:
        for tokens in batches_from(writer.n_contexts):   # restart where the durable shards end
            writer.add(run_with_cache(tokens), tokens)
        writer.finish()                                  # only finish() marks the store complete
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from datetime import datetime, timezone
from types import TracebackType

import torch
from fsspec import AbstractFileSystem
from jaxtyping import Float, Int
from safetensors.torch import save as save_safetensors
from torch import Tensor

from interplab.activations.store import (
    MANIFEST_NAME,
    SHARD_RE,
    STORE_FORMAT,
    STORE_VERSION,
    TMP_RE,
    TOKENS_KEY,
    CorruptShardError,
    ShardInfo,
    read_manifest,
    shard_name,
)
from interplab.dtypes import DTYPES
from interplab.errors import InterplabError
from interplab.fileio import atomic_write, join, list_files, open_url, sha256_hex
from interplab.runs import JSONDict, LOCK, check_output_folder, config_differences, folder_lock

# Manifest fields that identify a store: reopening it with any of them different is an error, not a resume.
IDENTITY_FIELDS = ("config", "hooks", "shapes", "dtype", "ctx_len", "contexts_per_shard")


class StoreWriter:
    """Writes activations and their token ids into a new store, or resumes a partial one.

    Leaving a `with` block, by an exception (KeyboardInterrupt included) or not, drops the contexts still buffered
    and keeps the durable shards for `resume=True`; only `finish()` writes the last partial shard and marks the
    store complete, because only the caller knows the harvest reached its target.
    """

    def __init__(
        self,
        url: str,
        *,
        config: JSONDict,
        hooks: list[str],
        shapes: dict[str, tuple[int, int]],
        dtype: str = "float32",
        contexts_per_shard: int = 256,
        resume: bool = False,
    ) -> None:
        self.url = url
        self.hooks = list(hooks)
        self._fs, self._root = open_url(url)
        self._identity = _identity(url, config, self.hooks, shapes, dtype, contexts_per_shard)
        self._dtype = DTYPES[dtype]
        self._shards: list[ShardInfo] = []
        self.complete = False
        self._closed = False
        self._buffer: dict[str, list[Tensor]] = {key: [] for key in [*self.hooks, TOKENS_KEY]}
        self._n_buffered = 0

        self._created_here = False
        self._lock = ExitStack()
        check_output_folder(url, "--out")
        existing = read_manifest(url)
        if existing is not None and existing["complete"]:
            self._reopen(existing, resume)  # a complete store is only read: no lock, nothing written
            return
        if existing is None:
            self._refuse_foreign()  # before the lock, which would otherwise leave its file in someone else's folder
        # Two writers must never interleave: a resumer's tidy-up would delete the shards another writer has just
        # moved into place ahead of its manifest. The lock is held until the writer is finished or closed.
        self._lock.enter_context(folder_lock(url, "harvest"))
        try:
            existing = read_manifest(url)  # again, under the lock: another writer may have changed it
            if existing is None:
                self._create()
            else:
                self._reopen(existing, resume)
        except BaseException:
            self._lock.close()
            raise

    @property
    def identity(self) -> JSONDict:
        """The manifest fields that define this store (IDENTITY_FIELDS), JSON-normalised; a copy."""
        return json.loads(json.dumps(self._identity))

    @property
    def n_contexts(self) -> int:
        """Contexts in durable shards: after a resume, the index of the first context to add."""
        return sum(s.n_contexts for s in self._shards)

    # ---- opening -------------------------------------------------------------------------------------------

    def _refuse_foreign(self) -> dict[str, int]:
        return refuse_foreign_folder(self.url)

    def _create(self) -> None:
        files = self._refuse_foreign()
        for name in files:  # only our own tmp files, left by a run killed before its first manifest
            if TMP_RE.fullmatch(name):
                self._fs.rm(join(self._root, name))
        self._fs.makedirs(self._root, exist_ok=True)
        self._created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write_manifest(self._shards, complete=False)
        self._created_here = True

    def _reopen(self, existing: JSONDict, resume: bool) -> None:
        differs = config_differences(existing["config"], self._identity["config"])
        # A field may be both in the config and in the manifest (contexts_per_shard): name it once.
        differs += [field for field in IDENTITY_FIELDS[1:]
                    if existing[field] != self._identity[field] and field not in differs]
        if differs:
            raise InterplabError(
                f"{self.url} holds a different store (differs in: {', '.join(differs)}); "
                "choose another --out or delete it"
            )
        self._created = existing["created"]
        self._shards = [ShardInfo(**s) for s in existing["shards"]]
        if existing["complete"]:
            self.complete = True
            return
        if not resume:
            raise InterplabError(
                f"{self.url} holds a partial store ({self.n_contexts} contexts durable, not complete); "
                "pass --resume to continue it, or delete it to start over"
            )
        self._check_and_tidy()

    def _check_and_tidy(self) -> None:
        """Check the listed shards are in place, then delete what an interrupted run left behind.

        Only sizes are checked, not sha256: hashing would read the whole store (slow on S3), and the reader
        verifies every shard's sha256 on each load anyway.
        """
        files = list_files(self._fs, self._root)
        for s in self._shards:
            if files.get(s.file) != s.bytes:
                found = "no file" if s.file not in files else f"{files[s.file]} bytes"
                raise CorruptShardError(
                    f"{s.file} in {self.url}: the manifest lists {s.bytes} bytes, found {found}; "
                    "delete the store and harvest again"
                )
        listed = {s.file for s in self._shards}
        for name in files:
            # An unlisted shard was moved into place just before a kill, ahead of its manifest update: it will be
            # written again, so drop it rather than rely on rename-over-existing.
            if TMP_RE.fullmatch(name) or (SHARD_RE.fullmatch(name) and name not in listed):
                self._fs.rm(join(self._root, name))

    # ---- writing -------------------------------------------------------------------------------------------

    def add(self, acts: dict[str, Float[Tensor, "batch pos d"]], tokens: Int[Tensor, "batch pos"]) -> None:
        """Buffer a batch of contexts; each time `contexts_per_shard` are buffered, write them as a shard."""
        self._check_open()
        batch = self._check_batch(acts, tokens)
        # Copy: the caller may reuse its tensors (a preallocated buffer, in-place hooks) after add() returns.
        for hook in self.hooks:
            self._buffer[hook].append(acts[hook].detach().to("cpu", self._dtype, copy=True))
        self._buffer[TOKENS_KEY].append(tokens.detach().to("cpu", torch.int32, copy=True))
        self._n_buffered += batch
        while self._n_buffered >= self._identity["contexts_per_shard"]:
            self._write_shard(self._identity["contexts_per_shard"])

    def finish(self) -> None:
        """Write the last partial shard and mark the store complete. A no-op on a complete store."""
        if self.complete:
            return
        self._check_open()
        if self._n_buffered:
            self._write_shard(self._n_buffered)
        self._write_manifest(self._shards, complete=True)
        self.complete = True
        self._lock.close()  # a complete store is never written again

    def _write_shard(self, n: int) -> None:
        """Write the first `n` buffered contexts as the next shard, then list it in the manifest."""
        merged = {key: torch.cat(parts) for key, parts in self._buffer.items()}
        data = save_safetensors({key: tensor[:n].contiguous() for key, tensor in merged.items()})
        info = ShardInfo(shard_name(len(self._shards)), n, sha256_hex(data), len(data))
        shards = [*self._shards, info]
        atomic_write(self._fs, join(self._root, info.file), data)
        self._write_manifest(shards, complete=False)
        # Only now, with shard and manifest durable, does the writer's own state move on.
        self._shards = shards
        self._buffer = {key: [tensor[n:]] for key, tensor in merged.items()}
        self._n_buffered -= n

    def _write_manifest(self, shards: list[ShardInfo], complete: bool) -> None:
        write_manifest(self._fs, self._root, self._identity, shards, complete=complete, created=self._created)

    # ---- checks and context manager ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.complete:
            raise InterplabError(f"{self.url} already holds a complete store; choose another --out or delete it")
        if self._closed:
            raise InterplabError(f"this writer for {self.url} is closed; open a new one with resume=True")

    def _check_batch(self, acts: dict[str, Tensor], tokens: Tensor) -> int:
        ctx_len = self._identity["ctx_len"]
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[1] != ctx_len:
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise InterplabError(f"tokens has shape {got}; expected (batch, ctx_len={ctx_len})")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise InterplabError(f"tokens has dtype {tokens.dtype}; expected integer token ids")
        if set(acts) != set(self.hooks):
            missing, extra = sorted(set(self.hooks) - set(acts)), sorted(set(acts) - set(self.hooks))
            raise InterplabError(f"add() got hooks {sorted(acts)} (missing {missing}, unexpected {extra}); "
                                 f"expected exactly {self.hooks}")
        batch = tokens.shape[0]
        for hook in self.hooks:
            expected = (batch, *self._identity["shapes"][hook])
            got = tuple(acts[hook].shape)
            if got != expected:
                raise InterplabError(f"acts[{hook!r}] has shape {got}; expected {expected} = "
                                     f"(batch from tokens, ctx_len, d)")
        return batch

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc_type is not None)

    def close(self, *, failed: bool = False) -> None:
        """Stop writing and release the store's lock; the durable shards stay for `resume=True`. A store this
        writer created that holds no shard yet is removed when `failed`, so that a run that failed before its
        first shard leaves nothing behind (no manifest that a rerun would take for a partial store)."""
        # Drop the unwritten partial shard: writing it now could record a half-finished batch as durable.
        self._buffer = {key: [] for key in self._buffer}
        self._n_buffered = 0
        self._closed = True
        try:
            if failed and self._created_here and not self._shards and not self.complete:
                for name in list_files(self._fs, self._root):
                    if name == MANIFEST_NAME or TMP_RE.fullmatch(name):
                        self._fs.rm(join(self._root, name))
        finally:
            self._lock.close()  # also removes the lock, and the folder if the lock created it, once it is empty


def write_manifest(
    fs: AbstractFileSystem, root: str, identity: JSONDict, shards: list[ShardInfo], *, complete: bool,
    created: str,
) -> None:
    """Write (atomically) the manifest of the store at `root` listing `shards` under the given identity fields."""
    n_contexts = sum(s.n_contexts for s in shards)
    manifest = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        **{key: identity[key] for key in IDENTITY_FIELDS},
        "n_contexts": n_contexts,
        "n_tokens": n_contexts * identity["ctx_len"],
        "complete": complete,
        "shards": [s._asdict() for s in shards],
        "created": created,
    }
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    atomic_write(fs, join(root, MANIFEST_NAME), data)


def _identity(
    url: str, config: JSONDict, hooks: list[str], shapes: dict[str, tuple[int, int]], dtype: str,
    contexts_per_shard: int,
) -> JSONDict:
    """Validate the constructor's arguments and return them as the manifest's identity fields, JSON-normalised."""
    if not isinstance(config, dict):
        raise InterplabError(f"config must be a dict, got {type(config).__name__}")
    try:
        # Round-trip so tuples become lists and comparing with a reloaded manifest is like for like.
        config = json.loads(json.dumps(config))
    except (TypeError, ValueError) as e:
        raise InterplabError(f"config for {url} must be JSON-serialisable: {e}") from None
    if dtype not in DTYPES:
        raise InterplabError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    if not hooks or len(set(hooks)) != len(hooks) or TOKENS_KEY in hooks:
        raise InterplabError(f"hooks {hooks} must be a non-empty list of distinct names, not including {TOKENS_KEY!r}")
    if sorted(shapes) != sorted(hooks):
        raise InterplabError(f"shapes has keys {sorted(shapes)}; expected one (ctx_len, d) per hook in {hooks}")
    for hook in hooks:
        shape = shapes[hook]
        if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise InterplabError(f"shapes[{hook!r}] is {shape}; expected (ctx_len, d) of positive ints")
    ctx_lens = {shapes[hook][0] for hook in hooks}
    if len(ctx_lens) != 1:
        raise InterplabError(f"hooks disagree on ctx_len ({sorted(ctx_lens)}); every hook sees the same contexts")
    if not (isinstance(contexts_per_shard, int) and contexts_per_shard >= 1):
        raise InterplabError(f"contexts_per_shard is {contexts_per_shard!r}; expected an int >= 1")
    return {
        "config": config,
        "hooks": list(hooks),
        "shapes": {hook: list(shapes[hook]) for hook in hooks},
        "dtype": dtype,
        "ctx_len": ctx_lens.pop(),
        "contexts_per_shard": contexts_per_shard,
    }


def refuse_foreign_folder(url: str) -> dict[str, int]:
    """The files of a store folder that holds no manifest yet, if they are only our own leftovers (temporary files,
    the lock); one `InterplabError` if it holds anything else or is a file."""
    fs, root = open_url(url)
    if fs.exists(root) and not fs.isdir(root):
        raise InterplabError(f"{url} is a file; an activation store needs a new or empty directory")
    files = list_files(fs, root)
    foreign = sorted(name for name in files if not TMP_RE.fullmatch(name) and not name.startswith(LOCK))
    if foreign:
        raise InterplabError(f"{url} is not empty and holds no interplab store (found {', '.join(foreign[:3])}); "
                             "choose a new or empty directory")
    return files
