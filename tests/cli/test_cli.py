"""The `interplab` command: generated options, one-line errors with exit code 2 that write nothing."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from interplab.activations.configs import HarvestConfig
from interplab.cli import COMMANDS, main
from interplab.config import field_docs


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_documents_every_option(command, capsys):
    config_cls = COMMANDS[command][0]
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(config_cls)
    for field in dataclasses.fields(config_cls):
        assert "--" + field.name.replace("_", "-") in text
        assert field.name in docs, f"{config_cls.__name__}.{field.name} has no docstring"
        assert docs[field.name][:40] in text


def test_field_docs_reads_the_string_under_each_field():
    docs = field_docs(HarvestConfig)
    assert docs["ctx_len"] == "Tokens per context (BOS included); at most the model's context length."


def _harvest_args(model_dir: Path, out: Path, **overrides: str) -> list[str]:
    args = {"model": str(model_dir), "hooks": "blocks.0.hook_resid_post", "corpus": "python-docs",
            "tokens": "256", "ctx-len": "32", "out": str(out), "device": "cpu"}
    args.update(overrides)
    return ["harvest", *[x for k, v in args.items() for x in (f"--{k}", v)]]


def test_harvest_then_inspect(tiny_gpt2_dir, tmp_path, capsys):
    assert main(_harvest_args(tiny_gpt2_dir, tmp_path / "s")) == 0
    assert "harvested 256 tokens" in capsys.readouterr().out
    assert main(["inspect", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "256 tokens in 1 shards" in out and "checksums verified" in out


@pytest.mark.parametrize("overrides, message", [
    ({"hooks": "blocks.9.hook_resid_post"}, r"unknown hook name.*valid names: hook_embed"),
    ({"model": "no/such/dir/"}, "model path 'no/such/dir/' does not exist"),
    ({"corpus": "missing-corpus.txt"}, "missing-corpus.txt"),
    ({"tokens": "0"}, "--tokens must be a positive number"),
    ({"ctx-len": "65"}, "--ctx-len 65 is longer than .* allows \\(64\\)"),
    ({"hooks": "blocks.0.attn.hook_pattern"}, "attention patterns are \\[batch, head, q, k\\]"),
    ({"dtype": "int8"}, "--dtype 'int8' is not one of"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_gpt2_dir, tmp_path, capsys, overrides, message):
    out = tmp_path / "out"
    assert main(_harvest_args(tiny_gpt2_dir, out, **overrides)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("interplab harvest: error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_out_dir_holding_a_different_store_is_refused_untouched(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_harvest_args(tiny_gpt2_dir, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(_harvest_args(tiny_gpt2_dir, out, corpus=str(_write_corpus(tmp_path)))) == 2
    assert "holds a different store" in capsys.readouterr().err
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}


def _write_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Document number {i} says hello to the world. " * 20})
                              for i in range(20)))
    return path


def test_corrupt_shard_is_reported_by_name(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_harvest_args(tiny_gpt2_dir, out, **{"tokens": "1024", "contexts-per-shard": "16"})) == 0
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["inspect", "--store", str(out)]) == 2
    assert "shard-00001.safetensors" in capsys.readouterr().err


def test_hooks_command_lists_names(tiny_gpt2_dir, capsys):
    assert main(["hooks", "--model", str(tiny_gpt2_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0])["n_layers"] == 3
    assert lines[1:3] == ["hook_embed", "hook_pos_embed"]
    assert lines[-2:] == ["ln_final.hook_normalized", "ln_final.hook_out"]


def test_perturb_command(tiny_gpt2_dir, tmp_path, capsys):
    out, figures = tmp_path / "p" / "perturb.json", tmp_path / "figs"
    argv = ["perturb", "--model", str(tiny_gpt2_dir), "--hook", "blocks.1.hook_resid_post",
            "--corpus", str(_write_corpus(tmp_path)), "--split", "all", "--n-contexts", "4", "--ctx-len", "8",
            "--n-steps", "3", "--targets", "isotropic,real,sae_decoder", "--device", "cpu",
            "--out", str(out), "--figures", str(figures)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sae_decoder skipped" in printed and "plateau median" in printed and "results written to" in printed
    data = json.loads(out.read_text())
    assert list(data["curves"]) == ["isotropic", "real"] and data["step_unit"] > 0
    assert data["config"]["later_hook"] == "blocks.2.hook_resid_post"
    assert (figures / "perturbation_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv[:-4], "--n-steps", "1"]) == 2
    assert "--n-steps must be >= 2" in capsys.readouterr().err


def _beliefs_train_args(out: Path, **overrides: str) -> list[str]:
    args = {"process": "mess3", "layers": "1", "d-model": "16", "heads": "1", "ctx": "3", "tokens": "1920",
            "batch-size": "32", "checkpoints": "480", "eval-sequences": "100", "out": str(out)}
    args.update(overrides)
    return ["beliefs", "train", *[x for k, v in args.items() for x in (f"--{k}", v)], "--no-progress"]


def test_beliefs_train_then_regress(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_beliefs_train_args(run)) == 0
    out = capsys.readouterr().out
    assert "trained 1,920 tokens" in out and "checkpoints at 480, 1,920" in out
    assert main(["beliefs", "regress", "--run", str(run), "--shuffles", "3"]) == 0
    out = capsys.readouterr().out
    assert "27 sequences × 3 = 81 points" in out and "concat" in out
    saved = json.loads((run / "regress.json").read_text())
    assert [row["tokens"] for row in saved["curve"]] == [480, 1920]
    assert all((run / "figures" / name).stat().st_size > 0 for name in
               ("belief_simplex.png", "belief_mse_vs_tokens.png", "belief_mse_per_layer.png"))
    # The same folder with another config is refused, in one line, exit 2.
    assert main(_beliefs_train_args(run, **{"d-model": "32"})) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different beliefs train run (differs in: config.d_model 16 → 32)" in err


def test_beliefs_regress_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["beliefs", "regress", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no beliefs train run (no config.json" in err


@pytest.mark.parametrize("args", [["--help"], ["sae", "train", "--help"], ["probe", "--help"], ["synth", "--help"]])
def test_help_imports_no_torch_transformers_or_matplotlib(args):
    """`interplab --help` reads only the config dataclasses: -X importtime lists every module the help loaded."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "interplab", *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: interplab" in proc.stdout
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "interplab" in loaded and "argparse" in loaded  # the listing works
    assert not loaded & {"torch", "transformers", "matplotlib", "numpy"}, sorted(loaded & {"torch", "numpy"})
