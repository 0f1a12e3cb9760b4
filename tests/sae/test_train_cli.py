"""`interplab sae train`: a nested command whose --help documents every option, sweeps, one-line errors (exit 2)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch
from test_sources import HOOK, synthetic, synthetic_store

import interplab.runs as runs_module

import interplab.sae.trainer as trainer_module
from interplab.cli import main
from interplab.activations.writer import StoreWriter
from interplab.config import field_docs
from interplab.runs import folder_lock
from interplab.sae.train_config import TrainConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "acts"
    synthetic_store(path, n_contexts=32)  # 512 tokens, d=32
    return path


def args(store: Path, out: Path, /, **options: str) -> list[str]:
    base = {"store": str(store), "arch": "topk", "k": "2", "expansion": "2", "tokens": "512", "batch-size": "128",
            "lr": "0.01", "out": str(out)}
    return ["sae", "train", *[x for k, v in {**base, **options}.items() for x in (f"--{k}", v)]]


def test_sae_help_lists_train_and_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sae", "--help"])
    assert exit_info.value.code == 0
    assert re.search(r"train\s+train sparse autoencoders", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert re.search(r"sae\s+sparse autoencoders", capsys.readouterr().out)

    with pytest.raises(SystemExit) as exit_info:
        main(["sae", "train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text
        assert field.name in docs, f"TrainConfig.{field.name} has no docstring"
        assert docs[field.name][:40] in text


def test_train_a_sweep_from_the_command_line(store, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(store, out, k="2,3")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("note:")]  # passes note
    assert lines[0].startswith("topk-k2-x2: fvu ") and lines[1].startswith("topk-k3-x2: fvu ")
    assert re.match(rf"trained 2 SAE\(s\) on 512 tokens into {re.escape(str(out))} \([\d,]+ tokens/s\)", lines[2])
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["metrics.json", "topk-k2-x2", "topk-k3-x2", "train_config.json"]
    assert main(args(store, out, k="2,3")) == 0
    assert "already holds this complete run (2 SAEs); nothing to do" in capsys.readouterr().out

    assert main(args(store, tmp_path / "relu", arch="relu", **{"l1-coefficient": "1,3"}, k="32")) == 0
    assert sorted(p.name for p in (tmp_path / "relu").iterdir() if p.is_dir()) == ["relu-l1c1-x2", "relu-l1c3-x2"]


@pytest.mark.parametrize("options, message", [
    ({"tokens": "0"}, "--tokens must be a positive number of tokens, got 0"),
    ({"k": "64"}, "k=64 must be < d_sae=64"),
    ({"arch": "relu", "l1-coefficient": "-1"}, "l1_coefficient must be >= 0, got -1.0"),
    ({"arch": "jumprelu", "l0-coefficient": "0.1,-0.5"}, "l0_coefficient must be >= 0, got -0.5"),
    ({"hook": "blocks.5.hook_mlp_out"}, r"unknown hook 'blocks.5.hook_mlp_out'; .* holds: blocks.0.hook_resid_post"),
    ({"arch": "mystery"}, "unknown --arch 'mystery'; valid: relu, topk, batchtopk, jumprelu, matryoshka"),
    ({"k": "2,3", "arch": "relu"}, "--k lists 2 values but relu does not use it; relu sweeps --expansion, --l1"),
    ({"store": "no/such/store"}, "no/such/store holds no activation store"),
    ({"model": "gpt2"}, "give one of --store DIR .*; got --store, --model"),
    ({"batch-size": "1024"}, "holds 480 tokens once position 0 of each context \\(BOS\\) is left out, fewer than one "
                             "batch \\(--batch-size 1024\\)"),
    ({"b-dec-init": "median"}, "--b-dec-init 'median' is not one of geometric_median, mean, zeros"),
    ({"lr-decay-start": "1.5"}, "--lr-decay-start is a fraction of training in \\[0, 1\\], got 1.5"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(store, tmp_path, capsys, options, message):
    out = tmp_path / "out"
    assert main(args(store, out, **options)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("interplab sae train: error: "), err
    assert re.search(message, err), err
    assert not out.exists()


def test_stream_mode_needs_a_hook_and_tokens(tiny_gpt2_dir, tmp_path, capsys):
    base = ["sae", "train", "--model", str(tiny_gpt2_dir), "--out", str(tmp_path / "o")]
    assert main(base + ["--tokens", "512"]) == 2
    assert "stream mode (--model) needs --hook" in capsys.readouterr().err
    assert main(base + ["--hook", "blocks.0.hook_resid_post"]) == 2
    assert "stream mode (--model) needs --tokens" in capsys.readouterr().err
    assert main(base + ["--hook", "blocks.0.hook_resid_post", "--tokens", "512", "--ctx-len", "65"]) == 2
    assert "--ctx-len 65 is longer than" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_different_run_in_out_is_refused_untouched(store, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(store, out)) == 0
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args(store, out, k="3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a different SAE run (differs in: k [2] → [3])" in err
    assert before == {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_resume_on_a_store_of_another_width_exits_2(tmp_path, capsys, monkeypatch):
    store = tmp_path / "s"
    synthetic_store(store, n_contexts=32)
    out = tmp_path / "o"

    real = trainer_module.Trainer.run

    def interrupted(self, wandb=None):
        self.callback = lambda t: (_ for _ in ()).throw(KeyboardInterrupt) if t.step == 2 else None
        return real(self, wandb)

    monkeypatch.setattr(trainer_module.Trainer, "run", interrupted)
    assert main(args(store, out, **{"checkpoint-every": "1"})) == 130
    assert "interrupted; the last checkpoint is kept, rerun with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    for p in store.iterdir():
        p.unlink()
    synthetic_store(store, n_contexts=32, d=16)
    assert main([*args(store, out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has changed since the run in" in err and "d" in err


# ---- issue 20: a run's identity includes its store; locks; files for folders; manifests that lie -----------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _interrupted_run(store: Path, out: Path, monkeypatch, capsys) -> None:
    real = trainer_module.Trainer.run

    def interrupted(self, wandb=None):
        self.callback = lambda t: (_ for _ in ()).throw(KeyboardInterrupt) if t.step == 2 else None
        return real(self, wandb)

    monkeypatch.setattr(trainer_module.Trainer, "run", interrupted)
    assert main(args(store, out, **{"checkpoint-every": "1", "tokens": "2048"})) == 130
    monkeypatch.undo()
    capsys.readouterr()


def test_resume_after_the_store_grew_is_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch):
    store, out = tmp_path / "s", tmp_path / "o"
    synthetic_store(store, n_contexts=48)  # 3 shards
    _interrupted_run(store, out, monkeypatch, capsys)
    for p in store.iterdir():
        p.unlink()
    synthetic_store(store, n_contexts=512)  # the same data, then more: 32 shards
    before = _snapshot(out)
    assert main([*args(store, out, tokens="2048"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{store} has changed since the run in {out} started on it (3 shards" in err
    assert "→ 32 shards" in err and "train into a new --out" in err
    assert _snapshot(out) == before


def test_an_unfinished_store_needs_a_flag(tmp_path, capsys):
    store, out = tmp_path / "s", tmp_path / "o"
    x = synthetic(32 * 16).view(32, 16, -1)
    with StoreWriter(str(store), config={"model": "synthetic"}, hooks=[HOOK], shapes={HOOK: (16, x.shape[-1])},
                     contexts_per_shard=16) as writer:
        writer.add({HOOK: x}, torch.zeros(32, 16, dtype=torch.long))  # two shards, never finished
    assert main(args(store, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is an unfinished harvest (512 tokens in 2 shards" in err
    assert "--allow-incomplete-store" in err and not out.exists()
    assert main([*args(store, out), "--allow-incomplete-store"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["store_data"]["complete"] is False and saved["store_data"]["shards"] == 2


def test_a_file_for_store_or_out_is_one_line(store, tmp_path, capsys):
    file = tmp_path / "f"
    file.write_bytes(b"not a folder")
    assert main(args(file, tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{file} is a file, not an activation store" in err
    assert main(args(store, file)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--out {file} is a file" in err
    assert main(args(store, file / "sub")) == 2
    assert f"lies under {file}, which is a file" in capsys.readouterr().err
    assert file.read_bytes() == b"not a folder" and not (tmp_path / "o").exists()


def test_an_unwritable_out_is_one_line_before_any_work(store, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runs_module.tempfile, "NamedTemporaryFile", refuse)  # we run as root: simulate
    monkeypatch.setattr(trainer_module, "run_identity", lambda cfg: pytest.fail("the store was opened"))
    assert main(args(store, tmp_path / "ro" / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write in {tmp_path} (PermissionError: Permission denied)" in err


def test_a_second_writer_of_the_run_folder_is_refused_naming_the_holder(store, tmp_path, capsys):
    out = tmp_path / "o"
    with folder_lock(str(out), "sae train"):
        assert main(args(store, out)) == 2
        err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"is being written by another process (pid {os.getpid()}" in err
    assert not out.exists()


def test_a_manifest_with_the_wrong_d_is_one_line_and_writes_nothing(tmp_path, capsys):
    store, out = tmp_path / "s", tmp_path / "o"
    synthetic_store(store, n_contexts=32)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shapes"] = {hook: [shape[0], 64] for hook, shape in manifest["shapes"].items()}
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert main(args(store, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard-0000" in err and "the manifest says [16, 16, 64]" in err
    assert not out.exists()
