"""Where `sae eval` and `perturb` write — one JSON result file (--out) and a figures folder (--figures) — checked
before any work, so that a refused run loads no model and writes nothing.

--out FILE must be
    new (its parent folders are made), or
    this command's earlier result of the SAME evaluation: its "kind" and its config equal, leaving out where and how
    it ran (out, figures, device, progress). That file is recomputed and replaced: the evaluation is seeded, so the
    numbers come out the same unless the SAE or the model behind those paths changed, and then the fresh ones are
    the right ones (reporting the old file instead could hand back numbers of an SAE that is no longer there).
Anything else — a folder, a file that is not a JSON object, another command's result, a different evaluation, a
parent that is a file — is one `InterplabError` naming what is there.

--figures DIR must be a folder or new; it may hold other files (the demo keeps all its figures in one folder), but
not a folder where a figure of this command goes. Existing figures of the same names are replaced.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from interplab.errors import InterplabError
from interplab.fileio import join, open_url, write_url_atomic
from interplab.runs import JSONDict, JSONValue, describe_differences, read_json_object, run_settings

__all__ = ["check_figures_folder", "check_result_file", "write_result"]

NOT_EVALUATION = ("figures",)
"""Config fields of a result file that say where its figures went, not what it computed (besides runs.NOT_IDENTITY)."""


def _check_parent(option: str, out: str, fs: AbstractFileSystem, path: str) -> None:
    """Refuse an output whose nearest existing ancestor is a file, or (local disks) a folder we cannot write into."""
    parent = posixpath.dirname(path.rstrip("/"))
    while parent and not fs.exists(parent):
        up = posixpath.dirname(parent)
        if up == parent:
            break
        parent = up
    if not parent or not fs.exists(parent):
        return
    if not fs.isdir(parent):
        raise InterplabError(f"{option} {out}: {parent} is a file, not a folder")
    if isinstance(fs, LocalFileSystem) and not os.access(parent, os.W_OK | os.X_OK):
        raise InterplabError(f"{option} {out}: cannot write into {parent} (permission denied)")


def _identity(config: Mapping[str, JSONValue], resolved_later: Sequence[str], wanted: Mapping[str, JSONValue]
              ) -> JSONDict:
    """What a result's config says about what was computed; fields in `resolved_later` that `wanted` leaves unset
    (None: filled in from the SAE or the model once loaded) are left out, to be compared again once resolved."""
    settings = run_settings(config)
    return {k: v for k, v in settings.items()
            if k not in NOT_EVALUATION and not (k in resolved_later and wanted.get(k) is None)}


def check_result_file(out: str | None, kind: str, config: Mapping[str, JSONValue], *,
                      is_legacy: Callable[[JSONDict], bool], resolved_later: Sequence[str] = ()) -> None:
    """Refuse `--out` unless it is new or holds this command's result of the same evaluation (see the module
    docstring). `is_legacy` recognises this command's results written before they carried "kind"."""
    if not out:
        return
    if out.endswith("/"):
        raise InterplabError(f"--out {out} names a folder; --out names the JSON file to write "
                             f"(e.g. {join(out, 'metrics.json')})")
    fs, path = open_url(out)
    _check_parent("--out", out, fs, path)
    if not fs.exists(path):
        return
    if fs.isdir(path):
        raise InterplabError(f"--out {out} is a folder; --out names the JSON file to write "
                             f"(e.g. {join(out, 'metrics.json')})")
    try:
        saved = read_json_object(out)
    except InterplabError:
        saved = {}
    saved_kind = saved.get("kind", kind if saved and is_legacy(saved) else None)
    saved_config = saved.get("config")
    if saved_kind != kind or not isinstance(saved_config, dict):
        what = f"a {saved_kind} result" if isinstance(saved_kind, str) and saved_kind != kind else "something else"
        raise InterplabError(f"--out {out} exists and holds {what}, not an interplab {kind} result; "
                             "choose a new file or delete it")
    have = _identity(saved_config, resolved_later, config)
    want = _identity(config, resolved_later, config)
    changes = describe_differences(have, want)
    if changes:
        raise InterplabError(f"--out {out} holds a different {kind} (differs in: {changes}); "
                             "choose another --out or delete it")


def check_figures_folder(folder: str | None, names: Sequence[str]) -> None:
    """Refuse `--figures` if it is a file, sits under a file, or holds a folder where one of `names` goes."""
    if not folder:
        return
    fs, path = open_url(folder)
    if fs.exists(path) and not fs.isdir(path):
        raise InterplabError(f"--figures {folder} is a file; --figures names a folder to write "
                             f"{', '.join(names)} into")
    _check_parent("--figures", folder, fs, path)
    taken = [name for name in names if fs.isdir(join(path, name))]
    if taken:
        raise InterplabError(f"--figures {folder} holds a folder named {taken[0]}, where a figure goes")


def write_result(out: str, result: Mapping[str, JSONValue]) -> None:
    """Write the result JSON atomically (the file is the old one or the whole new one)."""
    write_url_atomic(out, (json.dumps(result, indent=2) + "\n").encode())
