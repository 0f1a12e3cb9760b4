"""The run folder: one layout and one set of rules for every command that writes results.

    OUT/config.json     {"kind": ..., "config": {...}}: everything needed to rerun, and the identity of the run
    OUT/metrics.json    {"kind": ..., ...}: the results; written last, it marks the run complete
    OUT/figures/*.png   the run's figures
    OUT/.lock           held while a process writes the folder (local folders)

Rules (`Run.open`): --out must be new, empty, or a folder this command wrote with the same configuration; then a
complete run is reported as done, a partial one resumes. Anything else is one `InterplabError` that names what is
there, raised before anything is written. Two processes cannot write one folder at once: the second is refused with
the holder's process id. Object stores (s3://) have no locks; their runs are checked the same way otherwise.

    with Run.open(cfg.out, "probe", asdict(cfg)) as run:
        if run.status == "complete":
            return run.metrics
        ...
        run.write_metrics(result)
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout
from fsspec.implementations.local import LocalFileSystem

from interplab.errors import InterplabError
from interplab.fileio import join, open_url, write_url_atomic

CONFIG = "config.json"
METRICS = "metrics.json"
FIGURES = "figures"
LOCK = ".lock"
NOT_IDENTITY = ("out", "device", "resume", "progress")
"""Config fields that say where and how a run goes, not what it computes: a run moved to another folder, resumed on
another device or without a progress bar is the same run. They are left out of config.json's identity."""
TMP_RE = re.compile(r".*\.tmp-[0-9a-f]{32}")
"""The temporary names of `fileio.atomic_write` (a file not yet moved into place)."""
_MISSING = object()

JSONValue = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]
JSONDict = dict[str, JSONValue]
Status = Literal["new", "partial", "complete"]


def run_settings(config: Mapping[str, JSONValue]) -> JSONDict:
    """What config.json records of a command's config: every field but those in NOT_IDENTITY."""
    return {k: v for k, v in config.items() if k not in NOT_IDENTITY}


def finite_json(value: JSONValue) -> JSONValue:
    """`value` with every NaN or infinite float replaced by None (standard JSON has neither), through dicts and
    lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(x) for k, x in value.items()}
    if isinstance(value, list):
        return [finite_json(x) for x in value]
    return value


def read_json_object(url: str) -> JSONDict:
    """The JSON object stored at `url`; an `InterplabError` if it is unreadable, not UTF-8 JSON, or not an object."""
    fs, path = open_url(url)
    try:
        data = json.loads(fs.cat_file(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InterplabError(f"{url} is not a readable JSON file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise InterplabError(f"{url} holds JSON {type(data).__name__}, not an object")
    return data


def write_json(url: str, data: Mapping[str, JSONValue]) -> None:
    """Write `data` as indented JSON, atomically (the file is either the old one or the whole new one)."""
    write_url_atomic(url, (json.dumps(data, indent=1) + "\n").encode())


def config_differences(saved: Mapping[str, JSONValue], wanted: Mapping[str, JSONValue]) -> list[str]:
    """The keys whose values differ between two configs (present in one only counts), sorted, each once; where both
    values are objects, the differing keys inside them, dotted ("config.seed")."""
    differs: set[str] = set()
    for key in {*saved, *wanted}:
        a, b = saved.get(key, _MISSING), wanted.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            differs.update(f"{key}.{inner}" for inner in config_differences(a, b))
        elif a != b:
            differs.add(key)
    return sorted(differs)


def folder_entries(out: str) -> list[str]:
    """Names inside the folder `out` (none if it does not exist), without temporary files and the lock; an error if
    `out` is a file."""
    fs, root = open_url(out)
    if fs.exists(root) and not fs.isdir(root):
        raise InterplabError(f"{out} is a file; --out needs a new or empty folder, or this command's own folder")
    fs.invalidate_cache(root)
    names = [posixpath.basename(e.rstrip("/")) for e in fs.ls(root, detail=False)] if fs.exists(root) else []
    return sorted(n for n in names if not TMP_RE.fullmatch(n) and not n.startswith(LOCK))


def check_identity(out: str, config_name: str, identity: Mapping[str, JSONValue], what: str) -> JSONDict | None:
    """The saved identity `OUT/config_name` if it equals `identity`; None if the folder is new or empty.

    A folder that holds other things, or this file with different values, is refused with one line naming what is
    there (`what` names the kind of run in that line)."""
    names = folder_entries(out)
    if config_name not in names:
        if names:
            raise InterplabError(f"{out} is not empty and holds no interplab {what} run (found "
                                 f"{', '.join(names[:3])}); choose a new or empty --out")
        return None
    saved = read_json_object(join(out, config_name))
    changes = describe_differences(saved, identity)
    if changes:
        raise InterplabError(f"{out} holds a different {what} run (differs in: {changes}); "
                             "choose another --out or delete it")
    return saved


def describe_differences(saved: Mapping[str, JSONValue], wanted: Mapping[str, JSONValue]) -> str:
    """Each differing key of two configs with its old and new value ("config.seed 0 → 1, lr 0.01 → 0.02"), or ""
    when they are the same: the words of every "differs in" refusal."""
    return ", ".join(f"{key} {_at(saved, key)} → {_at(wanted, key)}" for key in config_differences(saved, wanted))


def _at(config: Mapping[str, JSONValue], dotted: str) -> str:
    """The value at a dotted key of a nested config, as JSON, or "(none)" where it is absent."""
    value: object = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return "(none)"
        value = value[part]
    return json.dumps(value)


def check_output_folder(url: str, flag: str) -> None:
    """Refuse, in one line and before any work, an output folder that cannot be written: `url` (or a folder above
    it) is a file, or the nearest existing folder does not let us create a file. Local paths only: an object
    store reports its own errors when written."""
    fs, root = open_url(url)
    if not isinstance(fs, LocalFileSystem):
        return
    path = Path(root)
    while not path.exists():
        if path.parent == path:
            return
        path = path.parent
    if not path.is_dir():
        where = "is a file" if str(path) == str(Path(root)) else f"lies under {path}, which is a file"
        raise InterplabError(f"{flag} {url} {where}; {flag} needs a folder (new, empty, or this command's own)")
    try:
        # Creating and removing a file is the only reliable test: access() ignores ACLs and read-only mounts.
        with tempfile.NamedTemporaryFile(dir=path, prefix=".interplab-write-test-"):
            pass
    except OSError as e:
        raise InterplabError(f"{flag} {url}: cannot write in {path} ({type(e).__name__}: {e.strerror or e}); "
                             "choose a folder you can write to") from None


@contextmanager
def folder_lock(out: str, what: str) -> Iterator[None]:
    """Hold `OUT/.lock` while the body runs (local folders; object stores have no locks). A second writer gets one
    line naming the holder's process id."""
    fs, root = open_url(out)
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    created = _highest_missing(root)  # the folder makedirs is about to create first, removed if left empty
    fs.makedirs(root, exist_ok=True)
    lock, holder = FileLock(join(root, LOCK)), join(root, LOCK + ".pid")
    new_lock_file = not os.path.exists(join(root, LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = open(holder).read().strip() if os.path.exists(holder) else "unknown"
        raise InterplabError(f"{out} is being written by another process (pid {pid}, lock {join(out, LOCK)}); "
                             f"wait for it to finish, or stop it, before running this {what} again") from None
    failed = True
    try:
        with open(holder, "w") as f:
            f.write(str(os.getpid()))
        yield
        failed = False
    finally:
        if os.path.exists(holder):
            os.remove(holder)
        lock.release()
        # A refused or failed run leaves no lock file of its own behind (a foreign folder stays as it was), and a
        # folder where nothing was written no trace at all.
        empty = not folder_entries(out)
        if (failed and new_lock_file) or empty:
            os.remove(join(root, LOCK))
        if empty and created is not None:
            for folder in [Path(root), *Path(root).parents]:
                os.rmdir(folder)
                if folder == created:
                    break


def _highest_missing(path: str) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
    missing = None
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def _forget_if_nothing_else(out: str) -> None:
    """Remove config.json of a new run that failed before writing anything else, so that a rerun with corrected
    options is not refused as "a different run" (a run that wrote more keeps it, to resume)."""
    if folder_entries(out) == [CONFIG]:
        fs, root = open_url(out)
        fs.rm(join(root, CONFIG))


@dataclass
class Run:
    """An open run folder (see the module docstring); made by `Run.open`."""

    out: str
    """The folder (local path or fsspec URL), without a trailing slash."""
    kind: str
    """The command that writes it, e.g. "probe" or "toy train"; stored in config.json and metrics.json."""
    status: Status
    """"new" (nothing there yet), "partial" (config.json but no metrics.json: resume) or "complete"."""
    metrics: JSONDict | None
    """metrics.json of a complete run, else None."""

    @classmethod
    @contextmanager
    def open(cls, out: str, kind: str, config: Mapping[str, JSONValue]) -> Iterator[Run]:
        """Check --out, lock it, and write config.json if it is new. Yields the `Run`; the lock is released on exit."""
        out = out.rstrip("/")
        identity: JSONDict = {"kind": kind, "config": run_settings(config)}
        check_output_folder(out, "--out")
        check_identity(out, CONFIG, identity, kind)  # before the lock: a refused run must leave nothing behind
        with folder_lock(out, kind):
            saved = check_identity(out, CONFIG, identity, kind)  # again: another process may have started it
            if saved is None:
                write_json(join(out, CONFIG), identity)
                try:
                    yield cls(out, kind, "new", None)
                except BaseException:
                    _forget_if_nothing_else(out)
                    raise
                return
            fs, root = open_url(out)
            if fs.exists(join(root, METRICS)):
                yield cls(out, kind, "complete", read_json_object(join(out, METRICS)))
                return
            yield cls(out, kind, "partial", None)

    def path(self, name: str) -> str:
        """OUT/name."""
        return join(self.out, name)

    def figure(self, name: str) -> str:
        """OUT/figures/name.png, the place for the run's figure `name`."""
        return join(join(self.out, FIGURES), f"{name}.png")

    def write_metrics(self, metrics: Mapping[str, JSONValue]) -> str:
        """Write metrics.json ({"kind": ..., **metrics}), which marks the run complete; return its path."""
        path = self.path(METRICS)
        write_json(path, {"kind": self.kind, **metrics})
        self.status, self.metrics = "complete", {"kind": self.kind, **metrics}
        return path
