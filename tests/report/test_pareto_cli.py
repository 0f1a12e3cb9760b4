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


def test_pareto_bad_metrics_files_are_one_line_and_write_nothing(tmp_path, capsys):
    good = metrics(tmp_path / "good.json", 16, 0.2, 0.8)
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\xff\xfe")
    (tmp_path / "text.json").write_text("not json at all")
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    (tmp_path / "typed.json").write_text(json.dumps({"config": {}, "metrics": {
        "sparsity": {"l0": "many"}, "reconstruction": {"fvu": 0.1}, "model_performance": {"ce_loss_score": 0.9}}}))
    (tmp_path / "folder.json").mkdir()
    out = tmp_path / "p.png"
    for name, message in [("binary.json", "is not a readable JSON file"), ("text.json", "is not a readable JSON file"),
                          ("list.json", "holds JSON list, not an object"), ("typed.json", "l0 is 'many', not a number"),
                          ("folder.json", "is not a readable JSON file")]:
        assert main(["report", "pareto", "--metrics", f"{good},{tmp_path / name}", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_pareto_out_must_be_a_png_file(tmp_path, capsys):
    good = metrics(tmp_path / "good.json", 16, 0.2, 0.8)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "dir").mkdir()
    for out, message in [(tmp_path / "dir", "is a folder"), (tmp_path / "notes.txt", "is not a PNG"),
                         (tmp_path / "notes.txt" / "p.png", "is a file, not a folder")]:
        assert main(["report", "pareto", "--metrics", good, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not any((tmp_path / "dir").iterdir())
    assert main(["report", "pareto", "--metrics", good, "--out", str(tmp_path / "p.png")]) == 0
    assert main(["report", "pareto", "--metrics", good, "--out", str(tmp_path / "p.png")]) == 0  # its own PNG: redrawn
