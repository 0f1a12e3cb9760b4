"""Reading an activation store: the manifest, sha256-verified shards, and shuffled token-level batches.

A store is a directory or any fsspec URL (a local path, `memory://...`, or `s3://...`, which needs
`pip install s3fs`, the `interplab[s3]` extra):

    manifest.json              what the store holds and which shards are durable, each with its sha256
    shard-00000.safetensors    one tensor per hook [contexts, ctx_len, d] + "tokens" int32 [contexts, ctx_len]
    shard-00001.safetensors    ...

A torchrun harvest (`interplab.activations.ranked`) leaves each rank's shards in its own folder, and its manifest
lists them in global order as `rank-00001/shard-00000.safetensors` and so on; readers need not know the difference.

Row r of a shard's flattened [contexts * ctx_len, d] view is the activation at token `tokens.flatten()[r]`, so any
row can be traced back to its text. Only files listed in the manifest are ever opened, and each is checked against
its sha256 on every load: a half-written or stray file can never leak into an analysis.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from safetensors.torch import load as load_safetensors
from torch import Tensor

from interplab.dtypes import DTYPES
from interplab.errors import InterplabError
from interplab.fileio import join, open_url, sha256_hex
from interplab.runs import JSONDict

STORE_FORMAT = "interplab.activations"
STORE_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_KEY = "tokens"
SHARD_RE = re.compile(r"shard-\d{5,}\.safetensors")
TMP_RE = re.compile(r"(manifest\.json|shard-\d{5,}\.safetensors)\.tmp-.+")  # our own half-written files
RANK_DIR_RE = re.compile(r"rank-\d{5}")
RANKED_SHARD_RE = re.compile(r"rank-\d{5}/shard-\d{5}\.safetensors")  # a shard of a torchrun harvest


def rank_dir(rank: int) -> str:
    """Folder of a torchrun harvest's rank `rank`: a store of its own, inside the merged store's folder."""
    return f"rank-{rank:05d}"


def shard_name(i: int) -> str:
    """File name of the i-th shard."""
    return f"shard-{i:05d}.safetensors"


class CorruptShardError(InterplabError):
    """A shard the manifest lists is missing, or its bytes do not match the recorded size or sha256."""


class NonFiniteShardError(InterplabError):
    """A shard holds NaN or inf activations (raised only when a reader asks for the check)."""

    def __init__(self, message: str, shard: str) -> None:
        super().__init__(message)
        self.shard = shard
        """File name of the offending shard."""


class ShardInfo(NamedTuple):
    """One entry of the manifest's shard list."""

    file: str
    n_contexts: int
    sha256: str
    bytes: int


# Field -> type of every manifest entry; the writer emits them in this order.
MANIFEST_FIELDS: dict[str, type] = {
    "format": str, "version": int, "config": dict, "hooks": list, "shapes": dict, "dtype": str, "ctx_len": int,
    "contexts_per_shard": int, "n_contexts": int, "n_tokens": int, "complete": bool, "shards": list, "created": str,
}


def read_manifest(url: str) -> JSONDict | None:
    """The validated manifest of the store at `url`, or None if there is no manifest.json."""
    fs, root = open_url(url)
    try:
        raw = fs.cat_file(join(root, MANIFEST_NAME))
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise InterplabError(f"{url} is a file, not an activation store (a folder holding {MANIFEST_NAME}, written "
                             "by interplab harvest)") from None
    except OSError as e:  # a folder named manifest.json, an unreadable file
        raise InterplabError(f"{join(url, MANIFEST_NAME)} cannot be read ({type(e).__name__}: "
                             f"{getattr(e, 'strerror', None) or e})") from None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise InterplabError(f"{join(url, MANIFEST_NAME)} is not valid JSON ({e}); delete the store and harvest again")
    problem = _manifest_problem(manifest)
    if problem:
        raise InterplabError(f"{join(url, MANIFEST_NAME)} is not a valid interplab store manifest: {problem}")
    return manifest


def _manifest_problem(m: object) -> str | None:
    """What is wrong with a parsed manifest, or None if it is consistent."""
    if not isinstance(m, dict) or m.get("format") != STORE_FORMAT:
        return f"expected format {STORE_FORMAT!r}"
    if m.get("version") != STORE_VERSION:
        return f"version {m.get('version')!r} is not {STORE_VERSION}; a different interplab version wrote it"
    for field, kind in MANIFEST_FIELDS.items():
        if not isinstance(m.get(field), kind):
            return f"field {field!r} is missing or not a {kind.__name__}"
    if m["dtype"] not in DTYPES:
        return f"dtype {m['dtype']!r} is not one of {', '.join(DTYPES)}"
    if not m["hooks"] or sorted(m["hooks"]) != sorted(m["shapes"]):
        return "'hooks' and the keys of 'shapes' differ"
    for hook, shape in m["shapes"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and shape[0] == m["ctx_len"] and isinstance(shape[1], int)):
            return f"shape of {hook!r} is {shape}, expected [ctx_len={m['ctx_len']}, d]"
    for i, s in enumerate(m["shards"]):
        if not (
            isinstance(s, dict) and sorted(s) == sorted(ShardInfo._fields) and _shard_file_ok(s["file"], i)
            and isinstance(s["n_contexts"], int) and s["n_contexts"] > 0
            and isinstance(s["sha256"], str) and isinstance(s["bytes"], int)
        ):
            return (f"shard entry {i} is not {{file: {shard_name(i)!r} (or rank-NNNNN/shard-NNNNN.safetensors), "
                    "n_contexts > 0, sha256, bytes}")
    if len({s["file"] for s in m["shards"]}) != len(m["shards"]):
        return "a shard file is listed twice"
    if sum(s["n_contexts"] for s in m["shards"]) != m["n_contexts"]:
        return "n_contexts is not the sum of the shards' n_contexts"
    if m["n_tokens"] != m["n_contexts"] * m["ctx_len"]:
        return "n_tokens is not n_contexts * ctx_len"
    return None


def _shard_file_ok(file: object, i: int) -> bool:
    """Entry i names shard i of a single-process store, or a rank's shard of a torchrun harvest."""
    return isinstance(file, str) and (file == shard_name(i) or RANKED_SHARD_RE.fullmatch(file) is not None)


class ActivationStore:
    """Read-only view of an activation store written by `StoreWriter` (complete or still partial)."""

    def __init__(self, url: str) -> None:
        manifest = read_manifest(url)
        if manifest is None:
            raise InterplabError(
                f"{url} holds no activation store (no {MANIFEST_NAME}); pass a directory a harvest wrote"
            )
        self.url = url
        self._fs, self._root = open_url(url)
        self.manifest: JSONDict = manifest
        self.hooks: list[str] = list(manifest["hooks"])
        self.ctx_len: int = manifest["ctx_len"]
        self.n_contexts: int = manifest["n_contexts"]
        self.n_tokens: int = manifest["n_tokens"]
        self.complete: bool = manifest["complete"]
        self.dtype: torch.dtype = DTYPES[manifest["dtype"]]
        self.shards: list[ShardInfo] = [ShardInfo(**s) for s in manifest["shards"]]
        self.max_buffered_rows: int = 0  # set by iter_batches; tests use it to check memory stays bounded

    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        return (f"ActivationStore({self.url!r}, {state}, {self.n_tokens} tokens in {len(self.shards)} shards, "
                f"hooks={self.hooks})")

    def d(self, hook: str) -> int:
        """Width of the activations stored for `hook`."""
        self._check_hooks([hook])
        return self.manifest["shapes"][hook][1]

    def _check_hooks(self, hooks: list[str]) -> list[str]:
        for hook in hooks:
            if hook not in self.hooks:
                raise InterplabError(f"unknown hook {hook!r}; {self.url} holds: {', '.join(self.hooks)}")
        return list(hooks)

    def load_shard(self, i: int, hooks: list[str] | None = None, *, check_finite: bool = False) -> dict[str, Tensor]:
        """Shard `i` as {hook: [n, ctx_len, d], "tokens": int32 [n, ctx_len]}, after checking its sha256.

        With `check_finite`, a NaN or inf in the activations of the requested hooks raises `NonFiniteShardError`.
        """
        if not 0 <= i < len(self.shards):
            raise InterplabError(f"shard index {i} is out of range; {self.url} has {len(self.shards)} shards")
        wanted = self.hooks if hooks is None else self._check_hooks(hooks)
        info = self.shards[i]
        try:
            data = self._fs.cat_file(join(self._root, info.file))
        except FileNotFoundError:
            raise CorruptShardError(
                f"{info.file} in {self.url} is missing: expected sha256 {info.sha256}, found no file; harvest again"
            ) from None
        digest = sha256_hex(data)
        if digest != info.sha256:
            raise CorruptShardError(
                f"{info.file} in {self.url} is corrupt: expected sha256 {info.sha256}, got {digest}; harvest again"
            )
        tensors = self._tensors(info, data)
        if check_finite:
            for hook in wanted:
                if not bool(torch.isfinite(tensors[hook]).all()):
                    bad = int((~torch.isfinite(tensors[hook])).sum())
                    raise NonFiniteShardError(
                        f"{info.file} in {self.url} holds {bad} non-finite (NaN/inf) values at {hook}", info.file
                    )
        return {hook: tensors[hook] for hook in wanted} | {TOKENS_KEY: tensors[TOKENS_KEY]}

    def _tensors(self, info: ShardInfo, data: bytes) -> dict[str, Tensor]:
        """The tensors of a shard whose bytes match the manifest, checked against what the manifest says they are:
        a hand-edited manifest (another `d`, a checksum of a file that is not safetensors) is named here, in one
        line, rather than failing later as a shape or parsing error."""
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # safetensors raises its own SafetensorError, or others, on foreign bytes
            raise CorruptShardError(f"{info.file} in {self.url} is not a safetensors file ({type(e).__name__}: "
                                    f"{str(e)[:120]}); its manifest entry was edited by hand: harvest again") from None
        expected = {hook: ([info.n_contexts, *shape], self.dtype) for hook, shape in self.manifest["shapes"].items()}
        expected[TOKENS_KEY] = ([info.n_contexts, self.ctx_len], torch.int32)
        for key, (shape, dtype) in expected.items():
            if key not in tensors:
                raise CorruptShardError(f"{info.file} in {self.url} holds no tensor {key!r} (it holds "
                                        f"{', '.join(sorted(tensors))}), unlike its manifest; harvest again")
            got = tensors[key]
            if list(got.shape) != shape or got.dtype != dtype:
                raise CorruptShardError(
                    f"{info.file} in {self.url} holds {key} of shape {list(got.shape)} {str(got.dtype)[6:]}, but "
                    f"the manifest says {shape} {str(dtype)[6:]} (n_contexts, ctx_len, d); the manifest does not "
                    "describe this store: harvest again")
        return tensors

    def iter_batches(
        self,
        hook: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 4,
        drop_last: bool = False,
        with_tokens: bool = False,
        dtype: torch.dtype | None = None,
        check_finite: bool = False,
        skip_positions: int = 0,
    ) -> Iterator[Float[Tensor, "batch d"] | tuple[Float[Tensor, "batch d"], Int[Tensor, " batch"]]]:
        """Token-level rows of `hook` in batches [batch, d] (with their int32 token ids [batch] if `with_tokens`).

        Each row is yielded exactly once (the last batch may be short unless `drop_last`). With `shuffle`, the
        shard order is shuffled and rows are shuffled within a buffer of at most `buffer_shards` shards, refilled
        a shard at a time as it drains; the same `seed` gives the same batches. Memory does not grow with the
        store: the buffer holds at most max(buffer_shards * rows_per_shard, batch_size - 1 + rows_per_shard) rows.
        With `check_finite`, each shard is checked as it is loaded (see `load_shard`). `skip_positions` leaves out
        the first positions of every context (1: BOS, whose norm can dwarf every other token's).
        """
        self._check_hooks([hook])
        if batch_size < 1 or buffer_shards < 1:
            raise InterplabError(f"batch_size={batch_size} and buffer_shards={buffer_shards} must both be >= 1")
        if not 0 <= skip_positions < self.ctx_len:
            raise InterplabError(f"skip_positions={skip_positions} must lie in [0, ctx_len={self.ctx_len})")
        # Arguments are checked above, eagerly; the generator below only starts on the first next().
        return self._batches(hook, batch_size, shuffle, seed, buffer_shards, drop_last, with_tokens,
                             dtype or self.dtype, check_finite, skip_positions)

    def _batches(
        self, hook: str, batch_size: int, shuffle: bool, seed: int, buffer_shards: int, drop_last: bool,
        with_tokens: bool, dtype: torch.dtype, check_finite: bool = False, skip: int = 0,
    ) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen).tolist() if shuffle else list(range(len(self.shards)))
        row_len = self.ctx_len - skip
        capacity = buffer_shards * max((s.n_contexts for s in self.shards), default=0) * row_len
        acts = torch.empty(0, self.d(hook), dtype=self.dtype)
        tokens = torch.empty(0, dtype=torch.int32)
        self.max_buffered_rows = 0
        while order or len(acts):
            # Top up with whole shards while they fit, and past capacity only as far as one full batch needs.
            new_acts, new_tokens, n_rows = [acts], [tokens], len(acts)
            while order:
                next_rows = self.shards[order[0]].n_contexts * row_len
                if n_rows + next_rows > capacity and n_rows >= batch_size:
                    break
                shard = self.load_shard(order.pop(0), [hook], check_finite=check_finite)
                new_acts.append(shard[hook][:, skip:].flatten(0, 1))
                new_tokens.append(shard[TOKENS_KEY][:, skip:].flatten())
                n_rows += next_rows
            if len(new_acts) > 1:
                acts, tokens = torch.cat(new_acts), torch.cat(new_tokens)
                self.max_buffered_rows = max(self.max_buffered_rows, len(acts))
                if shuffle:  # rows left from earlier shards are reshuffled with the new ones, so they mix
                    perm = torch.randperm(len(acts), generator=gen)
                    acts, tokens = acts[perm], tokens[perm]
            if len(acts) < batch_size and drop_last:  # only possible once every shard is loaded
                return
            n = min(batch_size, len(acts))
            # Copies, so a caller who keeps a batch does not keep the whole buffer alive.
            batch = acts[:n].to(dtype, copy=True)
            yield (batch, tokens[:n].clone()) if with_tokens else batch
            acts, tokens = acts[n:], tokens[n:]

    def iter_contexts(self, hooks: list[str] | None = None) -> Iterator[dict[str, Tensor]]:
        """All contexts in store order, shard by shard: {hook: [n, ctx_len, d], "tokens": int32 [n, ctx_len]}.

        Chunks of a shard's n contexts rather than single contexts, so that per-token statistics can be
        computed a shard at a time; the i-th context overall is row i of the concatenated chunks.
        """
        wanted = self.hooks if hooks is None else self._check_hooks(hooks)
        return (self.load_shard(i, wanted) for i in range(len(self.shards)))
