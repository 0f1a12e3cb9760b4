"""`run_heads`: the run folder of the head detectors, on the planted toy model (saved and loaded by spec)."""

from __future__ import annotations

import json

import pytest

from interplab.circuits.configs import HeadsConfig
from interplab.circuits.run_heads import format_summary, run_heads
from interplab.errors import InterplabError
from tests.circuits.test_detectors import L, planted_model


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    planted_model().save(folder)
    return folder


def test_run_folder_holds_scores_controls_figures_and_report(planted_dir, tmp_path):
    out = tmp_path / "heads"
    cfg = HeadsConfig(model=str(planted_dir), device="cpu", n_seqs=8, seq_len=L, batch_size=4, out=str(out))
    result = run_heads(cfg)
    assert json.loads((out / "config.json").read_text())["kind"] == "heads"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["kind"] == "heads" and saved["detectors"].keys() == result["detectors"].keys()
    prev = saved["detectors"]["previous_token"]
    assert prev["top"][0]["layer"] == 0 and prev["top"][0]["head"] == 0 and prev["top"][0]["score"] > 0.99
    assert prev["top"][0]["shuffled"] < 0.05 and prev["top"][0]["sem"] is not None
    assert saved["detectors"]["duplicate_token"]["top"][0]["head"] == 1
    assert saved["detectors"]["copying"]["score"][0] == pytest.approx([1.0, -1.0], abs=1e-5)
    assert saved["detectors"]["copying"]["sem"] is None  # a weight score is exact
    for name in saved["detectors"]:
        assert (out / "figures" / f"heads_{name}.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## previous-token" in report and "| L0H0 | 1.000 ± 0.000 |" in report
    assert "L0H0" in format_summary(result)
    assert run_heads(cfg)["detectors"] == saved["detectors"]  # complete: reported, not recomputed


def test_a_different_run_in_the_folder_is_refused(planted_dir, tmp_path):
    out = str(tmp_path / "heads")
    run_heads(HeadsConfig(model=str(planted_dir), device="cpu", n_seqs=4, seq_len=L, batch_size=4, out=out))
    with pytest.raises(InterplabError, match="differs in"):
        run_heads(HeadsConfig(model=str(planted_dir), device="cpu", n_seqs=4, seq_len=L, seed=1, out=out))


def test_bad_options_are_refused_before_anything_is_written(planted_dir, tmp_path):
    out = tmp_path / "heads"
    with pytest.raises(InterplabError, match="n-seqs"):
        run_heads(HeadsConfig(model=str(planted_dir), n_seqs=1, out=str(out)))
    assert not out.exists()
