"""`interplab decompose` end to end on a quickly trained TMS, and its bad inputs (exit 2, one line, nothing left)."""

from __future__ import annotations

import json

import pytest

from interplab.cli import main
from interplab.decompose import toys
from interplab.decompose.tms_models import tms_factory


@pytest.fixture(autouse=True)
def quick_toy(monkeypatch):
    """A TMS 5-2 trained for 200 steps, so the command runs in seconds (the scores are not the point here)."""
    monkeypatch.setitem(toys.TOYS, "tms-5-2", tms_factory(5, 2, identity=False, steps=200, batch_size=256))


def _one_line_exit_2(args, capsys):
    code = main(["decompose", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("args, words", [
    (["--toy", "nope"], "not known"),
    (["--toy", "tms-5-2", "--C", "0"], "--C must be"),
    (["--toy", "tms-5-2", "--method", "xyz"], "--method"),
    (["--toy", "tms-5-2", "--layers", "linear1,relu"], "not a linear weight"),
    ([], "exactly one of --toy"),
])
def test_bad_input_is_one_line_and_leaves_nothing(args, words, tmp_path, capsys):
    out = tmp_path / "run"
    line = _one_line_exit_2([*args, "--out", str(out), "--steps", "5", "--no-progress"], capsys)
    assert words in line
    assert not out.exists()


def test_run_writes_folder_and_a_rerun_reports_it(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["decompose", "--toy", "tms-5-2", "--steps", "20", "--warmup-steps", "5", "--eval-batch", "256",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "linear1: MMCS" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "decompose" and metrics["true_counts"] == {"linear1": 5, "linear2": 5}
    assert set(metrics["scores"]["layers"]) == {"linear1", "linear2"} and "random_model" in metrics
    for name in ("report.md", "figures/importance.png", "figures/max_cosines.png", "target/target.pt"):
        assert (out / name).is_file(), name
    before = (out / "metrics.json").read_bytes()
    assert main(args) == 0  # complete: reported, not recomputed
    assert (out / "metrics.json").read_bytes() == before
    assert main([*args, "--seed", "1"]) == 2  # another config in the same folder
