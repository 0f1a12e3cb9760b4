"""What a store or a training run reads, pinned down: the identity of a model's files, the digest of a store, and
the checks of an output folder made before any work is done.

A harvest records `model_identity(spec)` in its store and a training run records `manifest_digest(manifest)` in its
train_config.json, so that resuming onto changed inputs (a model folder whose weights were replaced, a store that
grew) is refused instead of producing an output that is neither run's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from huggingface_hub import constants

from interplab.models.load import SMOLLM2, smollm2_gguf_path
from interplab.runs import JSONDict, JSONValue

IDENTITY_NOT_IN_DIGEST = ("created",)
"""Manifest fields that do not describe the data: a store harvested again to the same bytes has the same digest."""


def model_identity(spec: str) -> JSONValue:
    """What identifies the files of the model `spec`, beyond its name.

    A local folder or file (a `.gguf`, `smollm2-135m`'s GGUF): each file's name, size and modification time (in
    ns), so that weights replaced under the same path change the identity without reading gigabytes. A hub id:
    the commit its local cache resolves `main` to, when it is cached ("not cached" otherwise).
    """
    if spec.lower() == SMOLLM2:
        return _files_identity(smollm2_gguf_path())
    path = Path(spec).expanduser()
    if path.exists():
        return _files_identity(path)
    return {"hub_revision": _hub_revision(spec)}


def _files_identity(path: Path) -> JSONDict:
    """{name: [bytes, mtime_ns]} of a file, or of every visible file directly inside a folder."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    identity: JSONDict = {}
    for file in files:
        stat = file.stat()
        identity[file.name] = [stat.st_size, stat.st_mtime_ns]
    return identity


def _hub_revision(spec: str) -> str:
    """The commit the local Hugging Face cache holds for `spec` (its `refs/main`), or "not cached"."""
    ref = Path(constants.HF_HUB_CACHE) / f"models--{spec.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or "unknown"
    except OSError:
        return "not cached"


def manifest_digest(manifest: JSONDict) -> str:
    """sha256 of a store's manifest (canonical JSON, without its creation time): it changes with any shard added,
    replaced or re-harvested with other settings, and with the store's completeness."""
    data = {k: v for k, v in manifest.items() if k not in IDENTITY_NOT_IN_DIGEST}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
