"""`interplab patch` and `interplab dla` end to end on small models: files, numbers against a hand-run patch, the
same-config rerun, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interplab.circuits.dla import direct_logit_attribution
from interplab.circuits.metrics import Baseline, MetricTargets, make_metric, normalise
from interplab.circuits.prompts import load_pairs
from interplab.cli import main
from interplab.models import load_model
from interplab.models.toy import ToyConfig, ToyTransformer


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy") / "model"
    ToyTransformer(ToyConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, d_vocab=64,
                             init_std=0.2, seed=1)).save(folder)
    return folder


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_patch_heads_writes_every_effect_with_its_null(toy_dir, tmp_path, capsys):
    out = tmp_path / "patch"
    args = ["patch", "--model", str(toy_dir), "--prompts", "induction", "--n-pairs", "6", "--sweep", "heads",
            "--out", str(out), "--device", "cpu"]
    assert main(args) in (0, None)
    metrics = json.loads((out / "metrics.json").read_text())
    grid = metrics["grids"]["head_out"]
    assert grid["axes"] == ["layer", "head"] and len(grid["mean"]) == 2 and len(grid["mean"][0]) == 4
    assert set(metrics["agreement"]) == {"head_out"} and (out / "figures" / "head_out.png").stat().st_size > 0
    assert "## head_out" in (out / "report.md").read_text()
    # the effect of L1H2, patched by hand with a full forward pass, normalised the same way
    model = load_model(str(toy_dir), device="cpu")
    batch = load_pairs(model, "induction", 6, 0)
    with torch.no_grad():
        clean_logits = model.forward(batch.clean)
        metric = make_metric("logit-diff", MetricTargets(batch.answer, batch.wrong, clean_logits[:, -1]))
        baseline = Baseline(metric(clean_logits), metric(model.forward(batch.corrupted)))
        clean_z = model.run_with_cache(batch.clean, ["blocks.1.attn.hook_z"]).cache["blocks.1.attn.hook_z"]

        def patch(z, name):
            z = z.clone()
            z[:, :, 2] = clean_z[:, :, 2]
            return z

        patched = metric(model.run_with_hooks(batch.corrupted, [("blocks.1.attn.hook_z", patch)]))
    expected = normalise(patched[:, None], baseline).mean()
    assert grid["mean"][1][2] == pytest.approx(float(expected), abs=1e-5)
    before = (out / "metrics.json").read_bytes()
    assert main(args) in (0, None)  # the same run again: reported, not redone
    assert (out / "metrics.json").read_bytes() == before


def test_dla_parts_in_the_run_folder_sum_to_the_logit_difference(tiny_llama_dir, tmp_path):
    out = tmp_path / "dla"
    assert main(["dla", "--model", str(tiny_llama_dir), "--prompts", "induction", "--n-pairs", "4", "--out", str(out),
                 "--device", "cpu"]) in (0, None)
    metrics = json.loads((out / "metrics.json").read_text())
    parts = sum(p["mean"] for p in metrics["parts"].values()) + metrics["constant"]
    assert parts == pytest.approx(metrics["logit_diff"]["mean"], abs=1e-4)
    model = load_model(str(tiny_llama_dir), device="cpu")
    batch = load_pairs(model, "induction", 4, 0)
    dla = direct_logit_attribution(model, batch.clean, batch.answer, batch.wrong)
    assert metrics["parts"]["L2H1"]["mean"] == pytest.approx(float(dla.head_parts[:, 2, 1].mean()), abs=1e-5)
    assert (out / "figures" / "dla.png").exists() and "Direct logit attribution" in (out / "report.md").read_text()


def _jsonl(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case", ["receiver layer", "receiver head", "missing field", "unequal lengths",
                                  "answer not one token"])
def test_bad_patch_input_is_one_line_exit_2_and_writes_nothing(case, tiny_llama_dir, toy_dir, tmp_path, capsys):
    good = {"clean": "the cat sat on the", "corrupted": "the dog sat on the", "answer": " mat", "wrong": " the"}
    model, extra = str(tiny_llama_dir), []
    if case.startswith("receiver"):
        model, prompts = str(toy_dir), "induction"
        extra = ["--sweep", "path", "--receivers", "2.0:q" if case == "receiver layer" else "1.4:q"]
    elif case == "missing field":
        prompts = _jsonl(tmp_path, [{k: v for k, v in good.items() if k != "wrong"}] * 4)
    elif case == "unequal lengths":
        prompts = _jsonl(tmp_path, [{**good, "corrupted": "the big dog sat on the"}] * 4)
    else:
        prompts = _jsonl(tmp_path, [{**good, "answer": " mat and more words"}] * 4)
    before = _snapshot(tmp_path)
    code = main(["patch", "--model", model, "--prompts", prompts, "--n-pairs", "4", "--out", str(tmp_path / "out"),
                 "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert _snapshot(tmp_path) == before
