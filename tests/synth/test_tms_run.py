"""`interplab synth tms`: the JSON numbers agree with the trained weights; bad parts are a one-line error."""

from __future__ import annotations

import json

from interplab.cli import main


def test_pictures_and_sweep_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "tms"
    assert main(["synth", "tms", "--steps", "200", "--sweep-instances", "3", "--out", str(out)]) == 0
    data = json.loads((out / "tms.json").read_text())
    assert len(data["pictures"]["represented"]) == len(data["pictures"]["sparsities"]) == 6
    assert all(0 <= r <= 5 for r in data["pictures"]["represented"])
    sweep = data["sweep"]
    assert len(sweep["d_star"]) == len(sweep["inverse_density"]) == 3
    assert sweep["inverse_density"][0] == 1.0 and abs(sweep["inverse_density"][-1] - 10.0) < 1e-9
    assert set(sweep["largest_cluster"]) == {"1", "3/4", "2/3", "1/2", "2/5", "3/8"}
    for name in ("tms_pictures.png", "tms_dimensionality.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "n=5, m=2: represented features per sparsity S=0:" in capsys.readouterr().out


def test_bad_parts(tmp_path, capsys):
    assert main(["synth", "tms", "--parts", "pictures,movie", "--out", str(tmp_path)]) == 2
    assert "choose from pictures, sweep" in capsys.readouterr().err
