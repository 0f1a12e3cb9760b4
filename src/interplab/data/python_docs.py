"""The built-in offline corpus: English prose that ships with every Python installation.

Two sources, in this fixed order:

1. every entry of `pydoc_data.topics.topics` (the language reference pages behind `help("assert")`), by topic name;
2. the module, class and function docstrings of the standard library, read by parsing the `.py` sources with `ast`
   (importing the modules would run their side effects and take far longer), files in sorted path order, and the
   docstrings of one file in `ast.walk` order.

Docstrings shorter than `MIN_DOCSTRING_CHARS` are dropped: they are mostly one-line summaries ("Return self.")
that add many near-identical documents and little text. Exact duplicates are kept once.

Parsing the whole standard library takes a few seconds, so the list is cached as JSON under
`$XDG_CACHE_HOME/interplab/` (default `~/.cache/interplab/`), one file per Python version.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from pydoc_data.topics import topics

from interplab.fileio import write_url_atomic

MIN_DOCSTRING_CHARS = 200

# Bump when the extraction rules change, so that old caches are not reused.
_CACHE_VERSION = 1

# Folders of the stdlib tree that hold tests, third-party packages or build artefacts rather than documentation.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}

_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def python_docs_documents() -> list[str]:
    """The built-in `python-docs` corpus: pydoc topics then stdlib docstrings, in a fixed order.

    Built from the running interpreter's own files, so it needs no download; cached on disk after the first call.
    """
    return load_or_build(cache_path(), build_python_docs)


def cache_path() -> Path:
    """Where the corpus is cached: keyed by Python implementation and version, whose stdlib it was built from."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    version = ".".join(str(part) for part in sys.version_info[:3])
    name = f"python-docs-v{_CACHE_VERSION}-{sys.implementation.name}-{version}.json"
    return Path(cache_home) / "interplab" / name


def load_or_build(path: Path, build: Callable[[], list[str]]) -> list[str]:
    """Read a JSON list of strings from `path`, or `build()` it and save it there atomically.

    An unreadable or malformed cache is rebuilt; a cache folder we cannot write to only costs the rebuild next time.
    """
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(docs, list) and docs and all(isinstance(doc, str) for doc in docs):
            return docs
    except (OSError, ValueError):
        pass

    docs = build()
    try:
        # A reader (or a second process building at the same time) never sees a half-written file.
        write_url_atomic(str(path), json.dumps(docs, ensure_ascii=False).encode("utf-8"))
    except OSError:
        pass
    return docs


def build_python_docs() -> list[str]:
    """Extract the corpus from scratch (a few seconds): pydoc topics, then stdlib docstrings, duplicates dropped."""
    docs = [topics[name] for name in sorted(topics)]
    for source_file in _stdlib_sources(Path(sysconfig.get_paths()["stdlib"])):
        docs.extend(_docstrings(source_file))
    # dict.fromkeys keeps the first occurrence of each text, in order.
    return list(dict.fromkeys(doc for doc in docs if doc.strip()))


def _stdlib_sources(root: Path) -> Iterator[Path]:
    """The stdlib `.py` files under `root` in sorted order, skipping tests and installed packages."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning and sorting `dirnames` in place makes os.walk skip those folders and visit the rest in order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("test", ".")))
        for filename in sorted(filenames):
            if filename.endswith(".py") and not filename.startswith("test_"):
                yield Path(dirpath) / filename


def _docstrings(source_file: Path) -> list[str]:
    """Module, class and function docstrings of one file, cleaned, at least `MIN_DOCSTRING_CHARS` long."""
    try:
        # Parsing bytes lets `ast` honour the file's own encoding declaration.
        tree = ast.parse(source_file.read_bytes(), filename=str(source_file))
    except (OSError, SyntaxError, ValueError):
        # A few stdlib files are deliberately invalid (e.g. lib2to3 fixtures); they hold no documentation we need.
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCSTRING_NODES):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                doc = inspect.cleandoc(doc)
                if len(doc) >= MIN_DOCSTRING_CHARS:
                    found.append(doc)
    return found
