"""TMS figures: the 2-D pictures and the dimensionality sweep plot are PNGs; bad shapes raise."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.synth.tms_figures import dimensionality_sweep, superposition_pictures
from interplab.synth.tms import TMSConfig, TMSResult, train_tms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_superposition_pictures_png(tmp_path):
    result = train_tms(TMSConfig(n_features=5, n_hidden=2, sparsities=[0.0, 0.9, 0.99], steps=200), progress=False)
    path = superposition_pictures(result, str(tmp_path / "pictures.png"))
    assert open(path, "rb").read(8) == PNG_MAGIC


def test_dimensionality_sweep_png(tmp_path):
    cfg = TMSConfig(n_features=20, n_hidden=5, sparsities=[0.0, 0.5, 0.8, 0.9], importance_decay=1.0, steps=200)
    path = dimensionality_sweep(train_tms(cfg, progress=False), str(tmp_path / "sweep.png"))
    assert open(path, "rb").read(8) == PNG_MAGIC


def _fake(n: int, m: int) -> TMSResult:
    cfg = TMSConfig(n_features=n, n_hidden=m, sparsities=[0.5])
    return TMSResult(W=torch.randn(1, m, n), b=torch.zeros(1, n), loss=torch.zeros(1), config=cfg, seconds=0.0)


def test_figures_reject_models_without_superposition(tmp_path):
    with pytest.raises(InterplabError, match="n_features > n_hidden"):
        dimensionality_sweep(_fake(3, 3), str(tmp_path / "x.png"))
    with pytest.raises(InterplabError, match="n_features > n_hidden"):
        superposition_pictures(_fake(2, 2), str(tmp_path / "x.png"))
    with pytest.raises(InterplabError, match="n_hidden = 2"):
        superposition_pictures(_fake(10, 3), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
