"""`interplab probe` end to end on a tiny model: a dataset whose label is visible in the text."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from interplab.cli import main
from interplab.errors import InterplabError
from interplab.probes.configs import ProbeConfig, RefusalConfig
from interplab.probes.probe_run import run_probe
from interplab.probes.refusal import run_refusal
from interplab.runs import run_settings


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its modification time: equal snapshots mean nothing was written."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    """Label 1 iff the text ends in 'dog': the last token's embedding separates the classes exactly."""
    g = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over a lazy cat".split()
    lines = []
    for i in range(120):
        body = " ".join(words[j] for j in torch.randint(len(words), (5,), generator=g).tolist())
        label = i % 2
        lines.append(json.dumps({"text": body + (" dog" if label else " cat"), "label": label}))
    path = tmp_path_factory.mktemp("probe") / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_probes_separate_a_visible_label_and_controls_do_not(labelled_file, tiny_gpt2_dir, tmp_path):
    cfg = ProbeConfig(model=str(tiny_gpt2_dir), hook="hook_embed", data=labelled_file, ks=[1, 2, 4], shuffles=3,
                      out=str(tmp_path / "out"), device="cpu")
    result = run_probe(cfg)
    assert result["n_examples"] == 120 and result["n_positive"] == 60
    assert result["diff_means"]["scores"]["auc"] == pytest.approx(1.0)
    assert result["logistic"]["scores"]["auc"] == pytest.approx(1.0)
    for method in ("diff_means", "logistic"):
        assert result[method]["controls"]["shuffled"]["auc"]["mean"] < 0.8
        assert result[method]["controls"]["random"]["auc"]["mean"] < 0.8
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["kind"] == "probe" and saved["ksparse"]["ks"] == [1, 2, 4]
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config == {"kind": "probe", "config": run_settings(json.loads(json.dumps(asdict(cfg))))}
    assert all((out / "figures" / name).stat().st_size > 0 for name in ("diff_means_projection.png", "ksparse_f1.png"))
    # a re-run of the complete run is reported as done: the saved metrics, nothing written again
    before = snapshot(out)
    assert run_probe(cfg) == saved
    assert snapshot(out) == before
    # an interrupted run (no metrics.json) resumes, reusing the cached activations
    (out / "metrics.json").unlink()
    again = run_probe(cfg)
    assert again["diff_means"]["scores"] == result["diff_means"]["scores"]
    assert (out / "metrics.json").is_file()
    # another config into the same folder is refused, naming what differs, and leaves the folder as it was
    before = snapshot(out)
    with pytest.raises(InterplabError, match=r"differs in: [^;]*\bseed\b"):
        run_probe(replace(cfg, seed=1))
    assert snapshot(out) == before


def test_probe_and_refusal_refuse_a_foreign_folder_and_write_nothing(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    for run in (lambda: run_probe(ProbeConfig(out=str(out))), lambda: run_refusal(RefusalConfig(out=str(out)))):
        with pytest.raises(InterplabError, match="is not empty and holds no interplab .*notes.txt"):
            run()  # refused before any model is loaded
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_cli_probe_and_its_errors(labelled_file, tiny_gpt2_dir, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--hook", "hook_embed", "--data", labelled_file,
                 "--methods", "diff-means", "--out", out, "--device", "cpu"]) == 0
    assert "diff_means: held-out AUC" in capsys.readouterr().out
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--data", labelled_file, "--methods", "svm",
                 "--out", out]) == 2
    assert "--methods" in capsys.readouterr().err
    with pytest.raises(InterplabError, match="neither a .csv/.jsonl file nor a built-in"):
        run_probe(ProbeConfig(model=str(tiny_gpt2_dir), hook="hook_embed", data="nope.txt", out=out, device="cpu"))
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["kind"] == "probe"
