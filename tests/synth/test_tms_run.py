"""`interplab synth tms`: the JSON numbers agree with the trained weights; bad parts are a one-line error; the run
folder is refused when foreign or of another config, and a complete one is reported, not retrained."""

from __future__ import annotations

import json

import pytest

from interplab.cli import main
from interplab.errors import InterplabError
from interplab.synth import tms_run
from interplab.synth.configs import TMSRunConfig
from interplab.synth.tms_run import run_tms


def test_pictures_and_sweep_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "tms"
    assert main(["synth", "tms", "--steps", "200", "--sweep-instances", "3", "--out", str(out)]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["kind"] == "synth tms" and json.loads((out / "config.json").read_text())["kind"] == "synth tms"
    assert len(data["pictures"]["represented"]) == len(data["pictures"]["sparsities"]) == 6
    assert all(0 <= r <= 5 for r in data["pictures"]["represented"])
    sweep = data["sweep"]
    assert len(sweep["d_star"]) == len(sweep["inverse_density"]) == 3
    assert sweep["inverse_density"][0] == 1.0 and abs(sweep["inverse_density"][-1] - 10.0) < 1e-9
    assert set(sweep["largest_cluster"]) == {"1", "3/4", "2/3", "1/2", "2/5", "3/8"}
    assert data["figures"] == {"pictures": f"{out}/figures/pictures.png",
                               "sweep": f"{out}/figures/dimensionality.png"}
    for name in ("pictures.png", "dimensionality.png"):
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    assert "n=5, m=2: represented features per sparsity S=0:" in capsys.readouterr().out


def test_bad_parts(tmp_path, capsys):
    assert main(["synth", "tms", "--parts", "pictures,movie", "--out", str(tmp_path)]) == 2
    assert "choose from pictures, sweep" in capsys.readouterr().err


def test_foreign_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "tms.json").write_text("{}")  # e.g. an older version's output
    with pytest.raises(InterplabError, match="not empty and holds no interplab synth tms run"):
        run_tms(TMSRunConfig(parts=["pictures"], steps=5, out=str(tmp_path)), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tms.json"]


def test_rerun_reports_the_saved_run_and_another_config_is_refused(tmp_path, monkeypatch):
    first = run_tms(TMSRunConfig(parts=["pictures"], steps=20, out=str(tmp_path)), progress=False)
    assert first == json.loads((tmp_path / "metrics.json").read_text())
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    def no_training(*args, **kwargs):
        raise AssertionError("a complete run was retrained")

    monkeypatch.setattr(tms_run, "train_tms", no_training)
    assert run_tms(TMSRunConfig(parts=["pictures"], steps=20, out=str(tmp_path)), progress=False) == first
    with pytest.raises(InterplabError, match=r"differs in: config\.seed 0 → 1\)"):
        run_tms(TMSRunConfig(parts=["pictures"], steps=20, seed=1, out=str(tmp_path)), progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files  # nothing rewritten
