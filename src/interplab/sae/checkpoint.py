"""The run folder of `interplab sae train`: its identity, resumable checkpoints and the final SAE folders.

    OUT/train_config.json      the run's TrainConfig; a later run with different settings is refused
    OUT/checkpoint.pt          the latest checkpoint, while the run is unfinished (deleted once it completes)
    OUT/<name>/                one per SAE of the sweep, e.g. topk-k32-x16/, written when training ends:
        cfg.json, sae_weights.safetensors     SAELens layout, input normalisation folded in (reads raw activations)
        train_config.json                     the run's TrainConfig, this SAE's SAEConfig and the normalisation scale
        metrics.json                          final metrics and their history (one entry per --log-every steps)
    OUT/metrics.json           every SAE's final metrics; written last, it marks the run complete

Metrics are averages over a logging window (the last one for the final metrics): `mse` per activation element in
raw units, `fvu` = sum ||x - x_hat||^2 / sum ||x - batch mean||^2, `l0` latents per token, `loss` the training loss
(normalised units), `dead_fraction` latents that have not fired for `dead_window_tokens`, `tokens_per_s` the
training speed of the run's last session.

Every file is written to a temporary name and renamed (an SAE folder is written whole under a temporary name,
then moved into place), so a run killed at any moment leaves the last checkpoint intact.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from fsspec.implementations.local import LocalFileSystem

from interplab.errors import InterplabError
from interplab.fileio import join, open_url, write_url_atomic
from interplab.runs import TMP_RE, JSONDict, JSONValue, check_identity, folder_entries, read_json_object, write_json
from interplab.sae.base import SparseAutoencoder
from interplab.sae.transcoder import Transcoder

CHECKPOINT = "checkpoint.pt"
RUN_CONFIG = "train_config.json"
SUMMARY = "metrics.json"
CHECKPOINT_FORMAT = "interplab.sae.checkpoint"
CHECKPOINT_VERSION = 1

Checkpoint = dict[str, Any]
"""A loaded checkpoint.pt: the trainer's state (tensors, numbers, strings and containers of them; see
`Trainer._checkpoint`)."""


class RunFolder(NamedTuple):
    """What --out holds before a run starts."""

    status: str
    """'new' (empty or absent), 'partial' (started, not complete) or 'complete'."""
    checkpoint: Checkpoint | None
    """The latest checkpoint of a partial run (None if it has none yet)."""
    summary: JSONDict | None
    """OUT/metrics.json of a complete run."""


def inspect_run_folder(out: str, identity: Mapping[str, JSONValue]) -> RunFolder:
    """Read --out without writing anything; refuse a folder that holds something other than this run (the same
    check, and the same one-line message, as every other command's run folder: `interplab.runs.check_identity`)."""
    if check_identity(out, RUN_CONFIG, identity, "SAE") is None:
        return RunFolder("new", None, None)
    names = folder_entries(out)
    if SUMMARY in names:
        return RunFolder("complete", None, read_json_object(join(out, SUMMARY)))
    return RunFolder("partial", load_checkpoint(out) if CHECKPOINT in names else None, None)


def refuse_changed_store(out: str, store: str | None, identity: Mapping[str, JSONValue]) -> None:
    """Refuse, in one line, to continue a run in `out` whose store has changed since it started (grown,
    harvested again): its train_config.json records another `store_data` than `identity` (`sources.run_identity`)."""
    if store is None or RUN_CONFIG not in folder_entries(out):
        return
    saved, now = read_json_object(join(out, RUN_CONFIG)).get("store_data"), identity.get("store_data")
    if not isinstance(saved, dict) or not isinstance(now, dict) or saved == now:
        return  # no record (another kind of run, or an older interplab): check_identity names the difference

    def described(data: Mapping[str, JSONValue]) -> str:
        state = "complete" if data.get("complete") else "unfinished"
        widths = data.get("d") if isinstance(data.get("d"), dict) else {}
        return (f"{data.get('shards')} shards, {data.get('tokens'):,} tokens, "
                f"d={'/'.join(map(str, widths.values())) or '?'}, {state}, "
                f"manifest {str(data.get('manifest_sha256'))[:12]}")

    raise InterplabError(f"{store} has changed since the run in {out} started on it ({described(saved)} → "
                         f"{described(now)}); continuing would train on other data: train into a new --out")


# ---- checkpoints -----------------------------------------------------------------------------------------------


def save_checkpoint(out: str, state: Checkpoint) -> None:
    """Write OUT/checkpoint.pt atomically: the previous checkpoint stays until the new one is whole."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buffer)
    write_url_atomic(join(out, CHECKPOINT), buffer.getvalue())


def load_checkpoint(out: str) -> Checkpoint:
    """OUT/checkpoint.pt, loaded onto the CPU (tensors, numbers, strings and containers only)."""
    fs, root = open_url(out)
    try:
        state = torch.load(io.BytesIO(fs.cat_file(join(root, CHECKPOINT))), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: unpickling errors come in many types, over many lines
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise InterplabError(f"{join(out, CHECKPOINT)} cannot be read ({type(e).__name__}: {reason}); "
                             f"delete it to restart the run") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InterplabError(f"{join(out, CHECKPOINT)} is not an interplab SAE checkpoint; delete it to restart")
    if state.get("version") != CHECKPOINT_VERSION:
        raise InterplabError(f"{join(out, CHECKPOINT)} has version {state.get('version')!r}, not "
                             f"{CHECKPOINT_VERSION}; a different interplab version wrote it")
    return state


def delete_checkpoint(out: str) -> None:
    """Remove OUT/checkpoint.pt (once the run is complete), if it is there."""
    fs, root = open_url(out)
    path = join(root, CHECKPOINT)
    if fs.exists(path):
        fs.rm(path)


# ---- final outputs ---------------------------------------------------------------------------------------------


def save_sae_folder(out: str, name: str, sae: SparseAutoencoder | Transcoder, *, metadata: Mapping[str, JSONValue],
                    files: Mapping[str, Mapping[str, JSONValue]]) -> str:
    """Save `sae` (SAELens layout; a transcoder in its layout, transcoder.py) plus the JSON `files` as OUT/<name>, replacing any earlier copy; return its URL.

    The folder is written whole under a temporary name, then moved into place.
    """
    fs, root = open_url(out)
    target, tmp = join(root, name), join(root, f"{name}.tmp-{uuid.uuid4().hex}")
    tmp_url = join(out, posixpath.basename(tmp))
    try:
        sae.save(tmp_url, metadata=metadata)
        for file, data in files.items():
            write_json(join(tmp_url, file), data)
        if fs.exists(target):
            fs.rm(target, recursive=True)
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, target)
        else:
            # Object stores have no folder to rename, and fsspec's recursive mv also copies the folder's own key,
            # which S3 does not have (NoSuchKey): move the files one by one.
            for src in fs.find(tmp):
                fs.mv(src, join(target, posixpath.relpath(src, tmp)))
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise
    return join(out, name)


def remove_stale_tmp(out: str) -> None:
    """Delete temporary files and folders an interrupted run left in OUT (they are never read)."""
    fs, root = open_url(out)
    if not fs.exists(root):
        return
    for entry in fs.ls(root, detail=False):
        if TMP_RE.fullmatch(posixpath.basename(entry.rstrip("/"))):
            fs.rm(entry, recursive=True)
