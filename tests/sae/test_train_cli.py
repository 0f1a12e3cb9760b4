"""`interplab sae train`: a nested command whose --help documents every option, sweeps, one-line errors (exit 2)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from test_sources import synthetic_store

import interplab.sae.trainer as trainer_module
from interplab.cli import main
from interplab.config import field_docs
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
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "topk-k2-x2", "topk-k3-x2", "train_config.json"]
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
    assert len(err.splitlines()) == 1 and "has width d=16, but the checkpoint in" in err
