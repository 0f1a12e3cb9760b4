"""The on-disk format of a dashboard's data: plain JSON wrapped in JavaScript, one file per chunk of latents.

A site folder SITE holds `SITE/data/`:

- `meta.js`: `window.INTERPLAB_META = {...};` (the run: SAE, model, hook, corpus, sizes, shared bin edges);
- `index.js`: `window.INTERPLAB_INDEX = {...};` (columns of length d_sae: id, freq, max_act, mean_act, top_token,
  top_logit), enough for search and sorting without opening any chunk;
- `chunk-00000.js`, ...: `window.INTERPLAB_CHUNK(c, [latent, ...]);`, latent i in chunk i // chunk_size at
  i % chunk_size.

Why JavaScript and not .json: a static site opened from file:// cannot fetch() JSON in Chromium, but it can load
`<script src=...>`. The payload between the fixed prefix and suffix is plain JSON (`json.dumps`, ensure_ascii=False,
no NaN/Infinity), so Python strips the wrapper and `json.loads` the rest. Text from the corpus is stored raw, never
HTML-escaped: escaping is the renderer's job. U+2028/U+2029 are written as JSON escapes so that older JavaScript
engines, where they end a line inside a string, still parse the file.

Completeness: `write_site_data` deletes `meta.js` first, writes every file atomically and `meta.js` last, so a
reader that finds `meta.js` finds a complete, consistent data folder; an interrupted write leaves no `meta.js`
(readers say "incomplete, rebuild") and simply re-running the build repairs it. Chunk files left over from an
earlier, larger build are deleted after `meta.js` is written (they are unreachable: `n_chunks` bounds the reads).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from fsspec import AbstractFileSystem

from interplab.errors import InterplabError
from interplab.fileio import join, open_url, read_url, write_url_atomic

FORMAT = 1
DATA_DIR = "data"
META_FILE = "meta.js"
INDEX_FILE = "index.js"
META_PREFIX = "window.INTERPLAB_META = "
INDEX_PREFIX = "window.INTERPLAB_INDEX = "
ASSIGN_SUFFIX = ";\n"
CHUNK_PREFIX = "window.INTERPLAB_CHUNK("
CHUNK_SUFFIX = ");\n"

META_KEYS = (
    "format", "sae", "model", "hook", "corpus", "n_tokens", "ctx_len", "d_sae", "chunk_size", "n_chunks",
    "window", "hist_edges", "logit_hist_edges", "quantile_bins",
)
INDEX_COLUMNS = ("id", "freq", "max_act", "mean_act", "top_token", "top_logit")
_CHUNK_RE = re.compile(r"^chunk-(\d{5,})\.js$")


def chunk_name(chunk: int) -> str:
    """File name of chunk `chunk`: `chunk-00000.js` (five digits, more if ever needed)."""
    return f"chunk-{chunk:05d}.js"


def n_chunks_for(d_sae: int, chunk_size: int) -> int:
    """ceil(d_sae / chunk_size)."""
    return -(-d_sae // chunk_size)


def dumps(obj: Any) -> str:
    """Compact JSON that is also valid JavaScript; raises InterplabError on NaN/Infinity (not JSON)."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError as e:
        raise InterplabError(f"dashboard data must be finite JSON: {e}") from e
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def encode_meta(meta: Mapping[str, Any]) -> str:
    """The text of `meta.js`."""
    return META_PREFIX + dumps(dict(meta)) + ASSIGN_SUFFIX


def encode_index(index: Mapping[str, Any]) -> str:
    """The text of `index.js`."""
    return INDEX_PREFIX + dumps(dict(index)) + ASSIGN_SUFFIX


def encode_chunk(chunk: int, latents: Sequence[Mapping[str, Any]]) -> str:
    """The text of `chunk-<chunk>.js`."""
    return f"{CHUNK_PREFIX}{chunk}, " + dumps([dict(x) for x in latents]) + CHUNK_SUFFIX


def _strip(text: str, prefix: str, suffix: str, what: str) -> str:
    # Tolerate a missing final newline (an editor may strip it) but nothing else.
    if text.endswith(suffix.rstrip("\n")) and not text.endswith(suffix):
        text += "\n"
    if not text.startswith(prefix) or not text.endswith(suffix):
        raise InterplabError(f"{what} is not dashboard data: expected '{prefix.strip()} ... {suffix.strip()}'")
    return text[len(prefix):len(text) - len(suffix)]


def _loads(text: str, what: str, kind: type) -> Any:
    """The JSON payload of a data file, which must be a `kind` (dict or list); one InterplabError otherwise."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InterplabError(f"{what} is not dashboard data: its JSON does not parse ({e}); rebuild the site with "
                             "`interplab dashboard build`") from None
    if not isinstance(value, kind):
        raise InterplabError(f"{what} is not dashboard data: holds JSON {type(value).__name__}, expected "
                             f"{kind.__name__}")
    return value


def decode_meta(text: str, what: str = META_FILE) -> dict:
    """Parse the text of `meta.js` back to its JSON object."""
    return _loads(_strip(text, META_PREFIX, ASSIGN_SUFFIX, what), what, dict)


def decode_index(text: str, what: str = INDEX_FILE) -> dict:
    """Parse the text of `index.js` back to its JSON object."""
    return _loads(_strip(text, INDEX_PREFIX, ASSIGN_SUFFIX, what), what, dict)


def decode_chunk(text: str, what: str = "chunk") -> tuple[int, list[dict]]:
    """Parse the text of a chunk file back to (chunk index, list of latents)."""
    body = _strip(text, CHUNK_PREFIX, CHUNK_SUFFIX, what)
    head, sep, rest = body.partition(", ")
    if not sep or not head.isdigit():
        raise InterplabError(f"{what} is not dashboard data: expected '{CHUNK_PREFIX}<int>, [...]);'")
    latents = _loads(rest, what, list)
    if not all(isinstance(x, dict) for x in latents):
        raise InterplabError(f"{what} is not dashboard data: its list holds something other than latent objects")
    return int(head), latents


def _is_int(v: Any, minimum: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= minimum


def _check_meta(meta: Mapping[str, Any]) -> None:
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise InterplabError(f"dashboard meta lacks {missing}; required keys: {list(META_KEYS)}")
    for key, minimum in (("d_sae", 1), ("chunk_size", 1), ("ctx_len", 1), ("n_tokens", 0)):
        if not _is_int(meta[key], minimum):
            raise InterplabError(f"dashboard meta {key} must be an integer >= {minimum}, got {meta[key]!r}")
    for key in ("sae", "model", "hook", "corpus"):
        if not isinstance(meta[key], str):
            raise InterplabError(f"dashboard meta {key} must be a string, got {meta[key]!r}")
    for key in ("hist_edges", "logit_hist_edges"):
        v = meta[key]
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise InterplabError(f"dashboard meta {key} must be a list of numbers")
    expected = n_chunks_for(meta["d_sae"], meta["chunk_size"])
    if meta["n_chunks"] != expected:
        raise InterplabError(
            f"dashboard meta n_chunks={meta['n_chunks']!r} but ceil(d_sae / chunk_size) = {expected}"
        )


def _check_index(index: Mapping[str, Any], d_sae: int) -> None:
    missing = [k for k in INDEX_COLUMNS if k not in index]
    if missing:
        raise InterplabError(f"dashboard index lacks columns {missing}; required: {list(INDEX_COLUMNS)}")
    bad = {k: len(v) if isinstance(v, list) else type(v).__name__ for k, v in index.items()
           if not isinstance(v, list) or len(v) != d_sae}
    if bad:
        raise InterplabError(f"dashboard index columns must have length d_sae={d_sae}, got lengths {bad}")


def _check_chunk(chunk: int, latents: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> None:
    size, d_sae = meta["chunk_size"], meta["d_sae"]
    want = list(range(chunk * size, min((chunk + 1) * size, d_sae)))
    got = [x.get("id") for x in latents]
    if got != want:
        shown = got if len(got) <= 6 else got[:3] + ["..."] + got[-2:]
        raise InterplabError(
            f"chunk {chunk} must hold latents {want[0] if want else '-'}..{want[-1] if want else '-'} in order "
            f"(chunk_size {size}, d_sae {d_sae}), got ids {shown}"
        )


def _iter_chunks(latents_by_chunk: Iterable[Sequence[Mapping[str, Any]]] | Mapping[int, Sequence[Mapping[str, Any]]],
                 ) -> Iterator[Sequence[Mapping[str, Any]]]:
    if isinstance(latents_by_chunk, Mapping):
        for c in sorted(latents_by_chunk):
            yield latents_by_chunk[c]
    else:
        yield from latents_by_chunk


def data_dir(folder: str) -> str:
    """`folder/data`, the data folder of site folder `folder`."""
    return join(folder, DATA_DIR)


def write_site_data(
    folder: str,
    meta: Mapping[str, Any],
    index: Mapping[str, Any],
    latents_by_chunk: Iterable[Sequence[Mapping[str, Any]]] | Mapping[int, Sequence[Mapping[str, Any]]],
) -> dict:
    """Write `folder/data/` (meta.js, index.js, chunk-*.js) and return the final meta.

    `latents_by_chunk` is an iterable of chunks in order (it may be a generator, so chunks are encoded and written
    one at a time) or a mapping chunk index -> list of latents. `meta["format"]` is set to FORMAT. Every file is
    written atomically; meta.js is removed first and written last (see the module docstring). Raises
    InterplabError for a meta without the contract's keys, index columns of the wrong length, or chunks whose
    latent ids are not exactly chunk*chunk_size ... in order.
    """
    meta = {**dict(meta), "format": FORMAT}
    _check_meta(meta)
    _check_index(index, meta["d_sae"])
    out = data_dir(folder)
    fs, out_path = open_url(out)
    meta_path = join(out_path, META_FILE)
    if fs.exists(meta_path):
        fs.rm(meta_path)
    n = 0
    for chunk, latents in enumerate(_iter_chunks(latents_by_chunk)):
        if chunk >= meta["n_chunks"]:
            raise InterplabError(f"got more than n_chunks={meta['n_chunks']} chunks of latents")
        _check_chunk(chunk, latents, meta)
        write_url_atomic(join(out, chunk_name(chunk)), encode_chunk(chunk, latents).encode("utf-8"))
        n += 1
    if n != meta["n_chunks"]:
        raise InterplabError(f"got {n} chunks of latents, meta says n_chunks={meta['n_chunks']}")
    write_url_atomic(join(out, INDEX_FILE), encode_index(index).encode("utf-8"))
    write_url_atomic(join(out, META_FILE), encode_meta(meta).encode("utf-8"))
    _remove_stale_chunks(fs, out_path, meta["n_chunks"])
    return meta


def _remove_stale_chunks(fs: AbstractFileSystem, out_path: str, n_chunks: int) -> None:
    fs.invalidate_cache(out_path)
    for entry in fs.ls(out_path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = _CHUNK_RE.match(name)
        if m and int(m.group(1)) >= n_chunks:
            fs.rm(entry)


def _resolve(folder: str) -> str:
    """The data folder: `folder/data`, or `folder` itself when it is a data folder (holds meta.js directly)."""
    fs, path = open_url(folder)
    if not fs.exists(join(path, join(DATA_DIR, META_FILE))) and fs.exists(join(path, META_FILE)):
        return folder
    return data_dir(folder)


def _read_text(url: str, what: str) -> str:
    try:
        data = read_url(url)
    except OSError as e:  # a folder where the file should be, unreadable, ...
        raise InterplabError(f"cannot read {what} at {url}: {e.strerror or e}") from None
    if data is None:
        raise InterplabError(f"{what} not found at {url}; build the dashboard data first (it may be incomplete)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InterplabError(f"{url} is not dashboard data: not UTF-8 text (a binary or damaged file); rebuild the "
                             "site with `interplab dashboard build`") from None


def load_meta(folder: str) -> dict:
    """The meta object of site folder `folder` (or of a data folder itself)."""
    d = _resolve(folder)
    meta = decode_meta(_read_text(join(d, META_FILE), "dashboard meta.js"), join(d, META_FILE))
    if meta.get("format") != FORMAT:
        raise InterplabError(f"{join(d, META_FILE)} has format {meta.get('format')!r}; this version reads {FORMAT}")
    try:
        _check_meta(meta)
    except InterplabError as e:
        raise InterplabError(f"{join(d, META_FILE)}: {e}") from None
    return meta


def load_index(folder: str) -> dict:
    """The index columns of site folder `folder` (id, freq, max_act, mean_act, top_token, top_logit)."""
    meta = load_meta(folder)  # refuses an incomplete data folder
    d = _resolve(folder)
    index = decode_index(_read_text(join(d, INDEX_FILE), "dashboard index.js"), join(d, INDEX_FILE))
    try:
        _check_index(index, meta["d_sae"])
    except InterplabError as e:
        raise InterplabError(f"{join(d, INDEX_FILE)}: {e}") from None
    return index


def load_chunk(folder: str, chunk: int, meta: Mapping[str, Any] | None = None) -> list[dict]:
    """The latents of chunk `chunk`."""
    meta = meta if meta is not None else load_meta(folder)
    if not 0 <= chunk < meta["n_chunks"]:
        raise InterplabError(f"chunk {chunk} out of range: the data has chunks 0..{meta['n_chunks'] - 1}")
    url = join(_resolve(folder), chunk_name(chunk))
    got, latents = decode_chunk(_read_text(url, f"dashboard chunk {chunk}"), url)
    if got != chunk:
        raise InterplabError(f"{url} says it is chunk {got}, expected {chunk}")
    try:
        _check_chunk(chunk, latents, meta)
    except InterplabError as e:
        raise InterplabError(f"{url}: {e}") from None
    return latents


def load_latent(folder: str, i: int) -> dict:
    """The data of latent `i` (reads its whole chunk)."""
    meta = load_meta(folder)
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < meta["d_sae"]:
        raise InterplabError(f"latent {i!r} out of range: the SAE has latents 0..{meta['d_sae'] - 1}")
    return load_chunk(folder, i // meta["chunk_size"], meta)[i % meta["chunk_size"]]


def iter_latents(folder: str) -> Iterator[dict]:
    """Every latent in id order, reading one chunk at a time."""
    meta = load_meta(folder)
    for c in range(meta["n_chunks"]):
        yield from load_chunk(folder, c, meta)
