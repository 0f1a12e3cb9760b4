"""Small fsspec helpers shared by every layer: open a URL, list a directory, hash bytes, write atomically.

Every path goes through fsspec, so a store or a checkpoint can live on a local disk, in `memory://` (tests) or on `s3://`.
S3 needs `pip install s3fs` (the `interplab[s3]` extra).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from interplab.errors import InterplabError


def open_url(url: str) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem behind `url` and the path of `url` inside it."""
    try:
        return url_to_fs(url)
    except (ImportError, ValueError) as e:
        # url_to_fs raises ImportError for s3:// without s3fs and ValueError for an unknown protocol.
        raise InterplabError(
            f"cannot open {url}: {e}; use a local path or an fsspec URL (s3:// needs `pip install s3fs`)"
        ) from e


def join(root: str, name: str) -> str:
    """`root/name` with exactly one slash; fsspec paths are always '/'-separated, even on Windows."""
    return f"{root.rstrip('/')}/{name}"


def list_files(fs: AbstractFileSystem, root: str) -> dict[str, int]:
    """Names and byte sizes of the files directly inside `root` ({} if `root` does not exist)."""
    fs.invalidate_cache(root)  # remote filesystems cache listings; we need what is there now
    if not fs.exists(root):
        return {}
    entries = fs.ls(root, detail=True)
    return {posixpath.basename(e["name"].rstrip("/")): e["size"] for e in entries if e["type"] == "file"}


def sha256_hex(data: bytes) -> str:
    """Hex sha256 digest of `data`."""
    return hashlib.sha256(data).hexdigest()


def atomic_write(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete, never half-written.

    The bytes go to `path.tmp-<uuid>` first and are then moved over `path`. On a local disk the move is an
    `os.replace` (an atomic rename, also over an existing file on Windows) after an fsync, so a crash cannot
    leave a renamed-but-empty file. On object stores such as S3 `mv` is copy-then-delete, and an object only
    becomes visible once fully uploaded, which gives the same guarantee.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        if isinstance(fs, LocalFileSystem):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
    except BaseException:
        # Includes KeyboardInterrupt: tidy up when we can; a leftover tmp file is harmless anyway, since readers
        # only open files the manifest lists and resume deletes `*.tmp-*`.
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise


def read_url(url: str) -> bytes | None:
    """The bytes of a local path or fsspec URL, or None if it does not exist."""
    fs, path = open_url(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return f.read()


def write_url_atomic(url: str, data: bytes) -> None:
    """`atomic_write` for a URL or local path, creating its parent folder if needed."""
    fs, path = open_url(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    atomic_write(fs, path, data)
