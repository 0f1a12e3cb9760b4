"""The built-in python-docs corpus: its content, its determinism and its on-disk cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from interplab.data import python_docs
from interplab.data.python_docs import MIN_DOCSTRING_CHARS, build_python_docs, cache_path, load_or_build


def test_corpus_is_large_real_english(python_docs: list[str]):
    assert len(python_docs) > 1000
    assert sum(len(doc) for doc in python_docs) > 1_000_000
    assert all(isinstance(doc, str) and doc.strip() for doc in python_docs)
    assert len(set(python_docs)) == len(python_docs)


def test_contains_every_pydoc_topic_first(python_docs: list[str]):
    from pydoc_data.topics import topics

    # Some topic names share one text (e.g. 'imaginary' and 'numbers'); the corpus keeps each text once.
    unique_topics = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    assert len(unique_topics) > 50
    assert python_docs[: len(unique_topics)] == unique_topics
    assert any("Assert statements are a convenient way to insert debugging" in doc for doc in python_docs)


def test_contains_a_known_stdlib_docstring(python_docs: list[str]):
    # The start of json/__init__.py's module docstring, as printed by `help(json)`.
    json_module = "JSON (JavaScript Object Notation) <https://json.org> is a subset of\nJavaScript syntax"
    assert any(doc.startswith(json_module) for doc in python_docs)
    # A class docstring, cleaned by inspect.cleandoc: no leading indentation survives on continuation lines.
    decoder = [doc for doc in python_docs if doc.startswith("Simple JSON <https://json.org> decoder")]
    assert len(decoder) == 1 and "\n    Performs" not in decoder[0] and "\nPerforms" in decoder[0]


def test_docstrings_respect_the_minimum_length(python_docs: list[str]):
    from pydoc_data.topics import topics

    docstrings = python_docs[len(set(topics.values())) :]
    assert docstrings and min(len(doc) for doc in docstrings) >= MIN_DOCSTRING_CHARS


def test_sources_skip_tests_and_installed_packages():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [path.relative_to(root) for path in python_docs._stdlib_sources(root)]
    assert Path("json/__init__.py") in files
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for f in files for part in f.parts)
    json_files = [f.name for f in files if f.parts[0] == "json"]
    assert json_files == ["__init__.py", "decoder.py", "encoder.py", "scanner.py", "tool.py"]


def test_cache_matches_a_fresh_build(python_docs: list[str]):
    # The session fixture went through the cache; a second build from scratch must give the identical list.
    assert cache_path().is_file()
    assert python_docs == build_python_docs()


def test_cache_path_follows_xdg_and_python_version(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = cache_path()
    assert path.parent == tmp_path / "interplab"
    assert f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}" in path.name


def test_load_or_build_writes_then_reuses(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    assert load_or_build(path, lambda: ["built"]) == ["built"]
    assert json.loads(path.read_text()) == ["built"]
    assert [p.name for p in path.parent.iterdir()] == ["cache.json"]  # no temporary file left behind

    def must_not_build() -> list[str]:
        raise AssertionError("the cache should have been used")

    assert load_or_build(path, must_not_build) == ["built"]


@pytest.mark.parametrize("content", ["{not json", '{"a": 1}', "[1, 2]", "[]", ""])
def test_load_or_build_rebuilds_an_unreadable_cache(tmp_path, content):
    path = tmp_path / "cache.json"
    path.write_text(content)
    assert load_or_build(path, lambda: ["rebuilt"]) == ["rebuilt"]
    assert json.loads(path.read_text()) == ["rebuilt"]


def test_load_or_build_survives_an_unwritable_cache_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    assert load_or_build(blocker / "cache.json", lambda: ["built"]) == ["built"]
