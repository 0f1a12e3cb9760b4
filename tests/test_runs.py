"""The run folder: what --out may hold, the one config-diff check, metrics.json marking completion, the lock."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from interplab.errors import InterplabError
from interplab.runs import Run, config_differences, folder_lock


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_new_folder_gets_config_json_with_kind_and_metrics_mark_completion(tmp_path):
    out = tmp_path / "run"
    with Run.open(str(out), "probe", {"seed": 1}) as run:
        assert run.status == "new"
        assert json.loads((out / "config.json").read_text()) == {"kind": "probe", "config": {"seed": 1}}
        run.write_metrics({"auc": 0.9})
        assert run.figure("roc") == f"{out}/figures/roc.png"
    assert json.loads((out / "metrics.json").read_text()) == {"kind": "probe", "auc": 0.9}
    assert not (out / ".lock.pid").exists()
    with Run.open(str(out), "probe", {"seed": 1}) as again:
        assert again.status == "complete" and again.metrics == {"kind": "probe", "auc": 0.9}


def test_started_but_unfinished_run_is_partial(tmp_path):
    with Run.open(str(tmp_path), "toy train", {"steps": 3}):
        pass  # killed before metrics.json
    with Run.open(str(tmp_path), "toy train", {"steps": 3}) as run:
        assert run.status == "partial" and run.metrics is None


@pytest.mark.parametrize("kind, config, differs", [
    ("probe", {"seed": 2}, r"different probe run \(differs in: config.seed 1 → 2\)"),
    ("lens", {"seed": 1, "k": 3}, r'differs in: config.k \(none\) → 3, kind "probe" → "lens"\)'),
])
def test_another_run_in_the_folder_is_refused_untouched(tmp_path, kind, config, differs):
    with Run.open(str(tmp_path), "probe", {"seed": 1}) as run:
        run.write_metrics({"auc": 0.5})
    before = _files(tmp_path)
    with pytest.raises(InterplabError, match=differs):
        with Run.open(str(tmp_path), kind, config):
            pass
    assert _files(tmp_path) == before


def test_foreign_folder_and_file_are_refused_and_nothing_is_written(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = _files(tmp_path)
    with pytest.raises(InterplabError, match=r"not empty and holds no interplab probe run \(found model.safetensors\)"):
        with Run.open(str(tmp_path), "probe", {}):
            pass
    assert _files(tmp_path) == before
    with pytest.raises(InterplabError, match="is a file"):
        with Run.open(str(tmp_path / "model.safetensors"), "probe", {}):
            pass


def test_config_differences_lists_each_key_once():
    assert config_differences({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}) == ["b", "c", "d"]
    assert config_differences({"config": {"x": 1, "y": [1]}}, {"config": {"x": 1, "y": [2]}}) == ["config.y"]


def _hold_lock(folder: str, ready: multiprocessing.Event, done: multiprocessing.Event) -> None:
    with folder_lock(folder, "test"):
        ready.set()
        done.wait(30)


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(InterplabError, match=rf"being written by another process \(pid {holder.pid}"):
            with Run.open(str(tmp_path / ""), "probe", {}):
                pass
    finally:
        done.set()
        holder.join(30)
    with Run.open(str(tmp_path), "probe", {}) as run:  # free again once the holder is gone
        assert run.status == "new"


def test_a_new_run_that_fails_before_writing_results_leaves_no_config(tmp_path):
    with pytest.raises(InterplabError, match="ctx_len too long"):
        with Run.open(str(tmp_path), "lens", {"ctx_len": 999}):
            raise InterplabError("ctx_len too long")
    assert _files(tmp_path) == {}
    with pytest.raises(InterplabError):
        with Run.open(str(tmp_path / "new"), "lens", {}):
            raise InterplabError("bad")
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt):  # the corrected rerun is accepted; it is interrupted after a checkpoint
        with Run.open(str(tmp_path), "lens", {"ctx_len": 64}) as run:
            assert run.status == "new"
            (tmp_path / "checkpoint.pt").write_bytes(b"x")
            raise KeyboardInterrupt
    with Run.open(str(tmp_path), "lens", {"ctx_len": 64}) as run:  # so its config stays, to resume
        assert run.status == "partial"


def test_where_and_how_a_run_goes_is_not_part_of_its_identity(tmp_path):
    with Run.open(str(tmp_path), "lens", {"seed": 1, "out": "a", "device": "cpu", "progress": True}) as run:
        run.write_metrics({"kl": 1.0})
    assert json.loads((tmp_path / "config.json").read_text())["config"] == {"seed": 1}
    with Run.open(str(tmp_path), "lens", {"seed": 1, "out": "b", "device": "cuda", "resume": True}) as run:
        assert run.status == "complete"


def test_a_failed_run_in_a_foreign_folder_leaves_no_lock_file(tmp_path):
    (tmp_path / "notes.txt").write_text("theirs")
    with pytest.raises(InterplabError, match="refused inside"):
        with folder_lock(str(tmp_path), "test"):
            raise InterplabError("refused inside")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(InterplabError):
        with Run.open(str(tmp_path / "c" / "d"), "probe", {}):
            raise InterplabError("bad")
    assert not (tmp_path / "c").exists()  # both folders it made are gone
