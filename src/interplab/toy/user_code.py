"""Loading the user's own Python named on the command line (`python:path/to/file.py:function`,
`python:package.module:function`), where every way it can go wrong is one `InterplabError`, raised before any run
folder is touched.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from interplab.errors import InterplabError


def load_python_object(what: str, where: str, attr: str) -> object:
    """`attr` of the module `where`: a .py file (when `where` ends in .py or holds a "/") or an importable module.
    `what` starts every error line (e.g. "task spec 'python:f.py:g'")."""
    module = _load_file(what, Path(where)) if where.endswith(".py") or "/" in where else _import(what, where)
    if not hasattr(module, attr):
        raise InterplabError(f"{what}: {where} has no attribute {attr!r}")
    return getattr(module, attr)


def check_callable_as(what: str, fn: Callable[..., object], name: str, params: Sequence[str],
                      example: Sequence[object]) -> None:
    """Raise unless `fn` accepts the positional arguments `example` (named `params` in the message)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: the call itself will tell
        return
    try:
        signature.bind(*example)
    except TypeError:
        raise InterplabError(f"{what}: {name}{signature} cannot be called as {name}({', '.join(params)}); "
                             f"it must take exactly those {len(params)} arguments") from None


def _import(what: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise InterplabError(f"{what}: cannot import {name} ({err})") from None
    except Exception as err:  # the module exists but its top level failed
        raise InterplabError(f"{what}: importing {name} raised {_one_line(err)}") from None


def _load_file(what: str, path: Path) -> ModuleType:
    """Run the Python file `path` as a fresh module."""
    if not path.is_file():
        raise InterplabError(f"{what}: no file {path}")
    if path.suffix != ".py":
        raise InterplabError(f"{what}: {path} is not a Python file (.py)")
    spec = importlib.util.spec_from_file_location(f"interplab_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise InterplabError(f"{what}: Python cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:  # also what a binary or non-UTF-8 file gives
        raise InterplabError(f"{what}: {path} is not valid Python (line {err.lineno}: {err.msg})") from None
    except Exception as err:  # its top level failed (a missing import, an error of its own)
        raise InterplabError(f"{what}: running {path} raised {_one_line(err)}") from None
    return module


def _one_line(err: BaseException) -> str:
    """"TypeName: first line of the message"."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
