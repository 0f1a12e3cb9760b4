"""Issue 20 for harvest and inspect: one line (exit 2) and nothing written for files given as folders, unwritable
folders, impossible sizes and manifests that lie; the store's lock; the model's files in the store's identity."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import interplab.activations.harvest as harvest_module
import interplab.runs as runs_module
from interplab.activations.writer import StoreWriter
from interplab.cli import main
from interplab.errors import InterplabError
from interplab.runs import folder_lock

HOOK = "blocks.0.hook_resid_post"


def harvest_args(model: Path, out: Path, **options: str) -> list[str]:
    base = {"model": str(model), "hooks": HOOK, "corpus": "python-docs", "tokens": "384", "ctx-len": "32",
            "batch-size": "4", "contexts-per-shard": "4", "device": "cpu", "out": str(out)}
    return ["harvest", *[x for k, v in {**base, **options}.items() for x in (f"--{k}", v)]]


def one_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"interplab {command}: error: "), err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def store(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("harvest") / "s"
    assert main(harvest_args(tiny_gpt2_dir, out)) == 0  # 12 contexts in 3 shards
    return out


def test_files_given_as_folders_are_one_line(tiny_gpt2_dir, tmp_path, capsys):
    file = tmp_path / "f"
    file.write_bytes(b"mine")
    assert main(harvest_args(tiny_gpt2_dir, file)) == 2
    assert f"--out {file} is a file" in one_line(capsys, "harvest")
    assert main(["inspect", "--store", str(file)]) == 2
    assert f"{file} is a file, not an activation store" in one_line(capsys, "inspect")
    assert file.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_an_unwritable_out_is_refused_before_the_model_is_loaded(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runs_module.tempfile, "NamedTemporaryFile", refuse)  # tests run as root: simulate
    monkeypatch.setattr(harvest_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(harvest_args(tiny_gpt2_dir, tmp_path / "o")) == 2
    assert f"cannot write in {tmp_path} (PermissionError: Permission denied)" in one_line(capsys, "harvest")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["tokens", "batch-size"])
def test_sizes_no_corpus_can_supply_are_refused_leaving_nothing(tiny_gpt2_dir, tmp_path, capsys, option):
    assert main(harvest_args(tiny_gpt2_dir, tmp_path / "o", **{option: str(10**24)})) == 2
    assert f"--{option} {10**24} is more than any corpus can supply" in one_line(capsys, "harvest")
    assert not (tmp_path / "o").exists()


def test_a_failure_before_the_first_shard_leaves_no_partial_store(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(str(tmp_path / "o"), config={}, hooks=[HOOK], shapes={HOOK: (4, 2)}):
            raise RuntimeError("the model failed")
    assert not (tmp_path / "o").exists()  # a rerun is a fresh start, not "a partial store"


def _inspect_err(store: Path, tmp_path: Path, capsys, edit) -> str:
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(copy, manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(copy)
    assert main(["inspect", "--store", str(copy)]) == 2
    assert snapshot(copy) == before
    return one_line(capsys, "inspect")


def test_inspect_names_a_shard_that_is_not_safetensors(store, tmp_path, capsys):
    def edit(copy: Path, manifest: dict) -> None:
        data = b"not a shard at all"
        (copy / "shard-00001.safetensors").write_bytes(data)
        manifest["shards"][1].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))

    err = _inspect_err(store, tmp_path, capsys, edit)
    assert "shard-00001.safetensors in" in err and "is not a safetensors file" in err


def test_inspect_compares_the_manifests_width_with_the_shards(store, tmp_path, capsys):
    def edit(copy: Path, manifest: dict) -> None:
        manifest["shapes"][HOOK] = [32, 64]

    err = _inspect_err(store, tmp_path, capsys, edit)
    assert f"shard-00000.safetensors in {tmp_path / 'copy'} holds {HOOK} of shape [4, 32, 32] float32, but the " \
           "manifest says [4, 32, 64] float32" in err


def test_resuming_after_the_models_weights_changed_is_refused(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, model)
    out = tmp_path / "s"
    _interrupted_harvest(model, out, monkeypatch, capsys)
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # weights replaced
    before = snapshot(out)
    assert main([*harvest_args(model, out), "--resume"]) == 2
    err = one_line(capsys, "harvest")
    assert "holds a different store (differs in: model_files.model.safetensors)" in err
    assert snapshot(out) == before


def _interrupted_harvest(model: Path, out: Path, monkeypatch, capsys) -> None:
    """A harvest of 3 shards stopped (Ctrl-C) while adding its third."""
    real, calls = StoreWriter.add, []

    def add(self, acts, tokens):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(self, acts, tokens)

    monkeypatch.setattr(StoreWriter, "add", add)
    assert main(harvest_args(model, out)) == 130
    monkeypatch.undo()
    capsys.readouterr()


def test_a_resumed_harvest_says_what_it_added_and_what_the_store_holds(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    _interrupted_harvest(tiny_gpt2_dir, out, monkeypatch, capsys)
    assert main([*harvest_args(tiny_gpt2_dir, out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"harvested 128 more tokens at {HOOK} into {out}" in printed
    assert "the store now holds 384 tokens" in printed


def test_a_second_writer_is_refused_and_tidies_nothing(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with StoreWriter(str(out), config={}, hooks=[HOOK], shapes={HOOK: (4, 2)}, contexts_per_shard=1) as w:
            w.add({HOOK: torch.zeros(1, 4, 2)}, torch.zeros(1, 4, dtype=torch.long))
            raise RuntimeError("killed")
    # The first writer's next shard, moved into place just before its manifest lists it:
    (out / "shard-00001.safetensors").write_bytes(b"being listed")
    with folder_lock(str(out), "harvest"):
        with pytest.raises(InterplabError, match=rf"is being written by another process \(pid {os.getpid()}"):
            StoreWriter(str(out), config={}, hooks=[HOOK], shapes={HOOK: (4, 2)}, contexts_per_shard=1, resume=True)
    assert (out / "shard-00001.safetensors").read_bytes() == b"being listed"
