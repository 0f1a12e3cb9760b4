"""tools/check_layers.py finds what it promises on a small package written for the test, and passes on interplab."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_layers", REPO / "tools" / "check_layers.py")
check_layers = importlib.util.module_from_spec(_spec)
sys.modules["check_layers"] = check_layers
_spec.loader.exec_module(check_layers)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src" / "interplab"
    for name, text in {"__init__.py": "", **files}.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_a_clean_package_has_no_problems(tmp_path):
    src = _package(tmp_path, {"errors.py": "", "sae/__init__.py": "", "sae/base.py": "from interplab.errors import X\n",
                              "sae/topk.py": "from interplab.sae.base import Y\nimport torch\n"})
    assert check_layers.check(src) == []


def test_climb_three_file_circle_and_hidden_import_are_each_reported(tmp_path):
    src = _package(tmp_path, {
        "models/__init__.py": "",
        "models/load.py": "from interplab.synth.planted import P\n",  # models (layer 2) -> synth (layer 5)
        "synth/__init__.py": "",
        "synth/planted.py": "from interplab.synth.a import A\n",
        "synth/a.py": "from interplab.synth.b import B\n",
        "synth/b.py": "from .planted import P\n",  # relative import closes a three-file circle
        "sae/__init__.py": "",
        "sae/trainer.py": "def f():\n    import numpy\n    import s3fs\n",
    })
    problems = check_layers.check(src)
    assert any(p.startswith("climbs: src/interplab/models/load.py:1: models (layer 2)") for p in problems), problems
    assert "file circle: interplab.synth.a <-> interplab.synth.b <-> interplab.synth.planted" in problems
    hidden = [p for p in problems if p.startswith("import inside a function")]
    assert hidden == ["import inside a function: src/interplab/sae/trainer.py:2 imports numpy"]  # s3fs is optional


def test_package_circle_across_layers_is_found(tmp_path):
    src = _package(tmp_path, {"evals/__init__.py": "", "evals/m.py": "import interplab.probes.p\n",
                              "probes/__init__.py": "", "probes/p.py": "from interplab.evals import m\n"})
    assert "package circle: evals <-> probes" in check_layers.check(src)


def test_interplab_itself_passes():
    assert check_layers.check(REPO / "src" / "interplab") == []
