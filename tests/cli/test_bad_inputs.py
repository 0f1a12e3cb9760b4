"""Every command, walked with a table of bad inputs: each must end in one line on stderr and exit code 2, with no
traceback, before any work, and without creating or changing a single file.

The table is generated from the config dataclasses (so a new command or option is covered the day it is added):
- every float option given nan and inf;
- --out given a folder that holds someone else's file, and given an existing file;
- every input path option (store, sae, run, site, root, metrics, data, model) given a binary non-UTF-8 file and an
  empty folder.
Each case runs in a fresh folder that is also the working directory, so a default output path would show up too.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from interplab.cli import COMMANDS, main

INPUT_PATHS = ("store", "sae", "run", "site", "root", "metrics", "data", "model")
"""Options that name something to read."""
FILE_OUTPUTS = {"sae eval", "perturb", "report pareto", "beliefs regress"}
"""Commands whose --out is a file, not a folder."""
BINARY = bytes(range(256)) * 4  # not UTF-8, not JSON, not safetensors, not a model


def _fields(command: str) -> dict[str, str]:
    cls = COMMANDS[command][0]
    hints = typing.get_type_hints(cls)
    return {f.name: str(hints[f.name]) for f in dataclasses.fields(cls)}


def _cases() -> list[tuple[str, str, str]]:
    """(command, option, value kind) for every case of the table."""
    cases = []
    for command in COMMANDS:
        fields = _fields(command)
        for name, kind in fields.items():
            if "float" in kind:
                cases += [(command, name, "nan"), (command, name, "inf")]
            if name in INPUT_PATHS:
                cases += [(command, name, "binary file"), (command, name, "empty folder")]
        if "out" in fields:
            cases += [(command, "out", "existing folder" if command in FILE_OUTPUTS else "foreign folder"),
                      (command, "out", "existing file")]
    return cases


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _value(kind: str, tmp_path: Path) -> str:
    if kind in ("nan", "inf"):
        return kind
    if kind in ("binary file", "existing file"):
        path = tmp_path / "given.bin"
        path.write_bytes(BINARY)
        return str(path)
    folder = tmp_path / "given"
    folder.mkdir()
    if kind == "foreign folder":
        (folder / "notes.txt").write_text("someone else's file\n")
    if kind == "existing folder":
        (folder / "result.json").write_text("{}\n")
    return str(folder)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("command, option, kind", _cases(), ids=lambda v: str(v).replace(" ", "-"))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(command, option, kind, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    value = _value(kind, tmp_path)
    before = _snapshot(tmp_path)
    try:
        code = main([*command.split(), f"--{option.replace('_', '-')}", value])
    except SystemExit as exit_info:  # argparse's own refusals (a nan float) exit from inside parse_args
        code = exit_info.code
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr: {captured.err[-1500:]}"
    assert len(err) == 1 and err[0].startswith("interplab"), captured.err[-1500:]
    assert "Traceback" not in captured.err
    assert _snapshot(tmp_path) == before, "files were created or changed"
