"""`interplab transcoder train`: a sweep from the command line, its files, and bad input (one line, exit 2, nothing
written)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

import interplab.sae.crosslayer_train as train_module
from interplab.cli import main
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.transcoder_files import load_transcoder_set


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"the model reads sentence {i} and writes its MLP output {i % 5}" for i in range(60)))
    return path


def args(model: Path, corpus: Path, out: Path, /, **options: str) -> list[str]:
    base = {"model": str(model), "corpus": str(corpus), "split": "all", "ctx-len": "16", "batch-size": "4",
            "tokens": "300", "d-sae": "24", "k": "2", "lr": "0.01", "device": "cpu", "out": str(out)}
    return ["transcoder", "train", *[x for k, v in {**base, **options}.items() for x in (f"--{k}", v)]]


def test_train_a_sweep_from_the_command_line(tiny_gpt2_dir, corpus, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(args(tiny_gpt2_dir, corpus, out, k="2,3", **{"d-sae": "24,32"})) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["clt-topk-k2-f24", "clt-topk-k3-f24", "clt-topk-k2-f32", "clt-topk-k3-f32"]
    for line, name in zip(lines, names):
        assert re.match(rf"{name}: fvu [\d.]+ \(per layer [\d.]+/[\d.]+/[\d.]+\)  l0 [\d.]+  dead [\d.]+%", line)
    assert re.match(rf"trained 4 CLT\(s\) on 300 tokens into {re.escape(str(out))} \([\d,]+ tokens/s\)", lines[4])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock")) == \
        sorted([*names, "metrics.json", "train_config.json"])
    summary = json.loads((out / "metrics.json").read_text())
    assert sorted(summary["clts"]) == sorted(names) and summary["tokens"] == 300  # 5 steps of 4 x 15 tokens
    clt = load_transcoder_set(str(out / "clt-topk-k3-f32"))
    assert isinstance(clt, CrossLayerTranscoder) and (clt.n_layers, clt.d_model, clt.d_sae, clt.k) == (3, 32, 32, 3)
    assert main(args(tiny_gpt2_dir, corpus, out, k="2,3", **{"d-sae": "24,32"})) == 0
    assert "already holds this complete run (4 CLTs); nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("options, message", [
    ({"k": "24"}, "topk needs 1 <= k < d_sae, got k=24 with d_sae=24"),
    ({"d-sae": "0"}, "--d-sae values must be >= 1, got [0]"),
    ({"activation": "gelu"}, "unknown --activation 'gelu'; valid: relu, jumprelu, topk"),
    ({"in-hook": "blocks.{layer}.mlp.hook_nope"}, r"unknown hook name(s) ['blocks.0.mlp.hook_nope'"),
    ({"out-hook": "blocks.5.hook_mlp_out"}, "--out-hook must be a template with {layer}"),
    ({"tokens": "59"}, "--tokens 59 is less than one batch (60 tokens: --batch-size 4 contexts of 15 trained"),
    ({"tokens": "0"}, "--tokens must be >= 1, got 0"),
    ({"k": "2,3", "activation": "relu"}, "--k lists 2 values but relu does not use it"),
    ({"ctx-len": "500", "tokens": "4000"}, "--ctx-len 500 is longer than"),
    ({"corpus": "no/such/corpus.txt"}, "no/such/corpus.txt"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_gpt2_dir, corpus, tmp_path, capsys, options, message):
    out = tmp_path / "o"
    assert main(args(tiny_gpt2_dir, corpus, out, **options)) == 2
    err = capsys.readouterr().err
    assert err.startswith("interplab transcoder train: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()


def test_an_sae_run_folder_is_refused(tiny_gpt2_dir, corpus, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps({"arch": "topk"}))
    assert main(args(tiny_gpt2_dir, corpus, out)) == 2
    assert "holds a different CLT run (differs in: " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["train_config.json"]


def test_interrupted_then_resumed_from_the_command_line(tiny_gpt2_dir, corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C keeps the checkpoint (exit 130); --resume finishes with the same weights as a straight run."""
    out, straight = tmp_path / "cut", tmp_path / "straight"
    assert main(args(tiny_gpt2_dir, corpus, straight, **{"checkpoint-every": "2"})) == 0
    original = train_module.CLTTrainer._train_step

    def interrupted(self, tokens, step):
        if step == 3:
            raise KeyboardInterrupt
        original(self, tokens, step)
    monkeypatch.setattr(train_module.CLTTrainer, "_train_step", interrupted)
    assert main(args(tiny_gpt2_dir, corpus, out, **{"checkpoint-every": "2"})) == 130
    assert "interrupted; the last checkpoint is kept, rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(train_module.CLTTrainer, "_train_step", original)
    assert main([*args(tiny_gpt2_dir, corpus, out, **{"checkpoint-every": "2"}), "--resume"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    for name in ("W_enc_1.safetensors", "W_dec_0.safetensors"):
        a, b = (load_file(folder / "clt-topk-k2-f24" / name) for folder in (straight, out))
        assert sorted(a) == sorted(b) and all(a[key].equal(b[key]) for key in a)
