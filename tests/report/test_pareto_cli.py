"""`interplab report pareto`: one point per metrics file; a file that is not an evaluation is a one-line error."""

from __future__ import annotations

import json

from interplab.cli import main


def metrics(path, l0, fvu, score):
    path.write_text(json.dumps({"config": {"sae": f"saes/k{int(l0)}"},
                                "metrics": {"sparsity": {"l0": l0}, "reconstruction": {"fvu": fvu},
                                            "model_performance": {"ce_loss_score": score}}}))
    return str(path)


def test_pareto_png_from_metrics(tmp_path, capsys):
    files = [metrics(tmp_path / "a.json", 16, 0.2, 0.8), metrics(tmp_path / "b.json", 64, 0.1, 0.95)]
    out = tmp_path / "p.png"
    assert main(["report", "pareto", "--metrics", ",".join(files), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_pareto_rejects_other_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["report", "pareto", "--metrics", str(bad), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "not an `interplab sae eval` metrics file" in err
    assert not (tmp_path / "p.png").exists()
