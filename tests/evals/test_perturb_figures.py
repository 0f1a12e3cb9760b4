"""The perturbation-curves figure: a valid PNG from a hand-made result, robust to zeros and missing values."""

from __future__ import annotations

import numpy as np
import pytest

from interplab.errors import InterplabError
from interplab.evals.perturb_figures import perturbation_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_result(kinds=("isotropic", "mean_cov", "real", "sae_decoder"), n_steps=11):
    steps = np.linspace(0, 1, n_steps)

    def stats(curve):
        return {"mean": list(curve), "sem": [0.01] * n_steps,
                **{f"p{q}": list(curve * (0.5 + q / 100)) for q in (10, 25, 50, 75, 90)}}

    curves = {}
    for i, kind in enumerate(kinds):
        kl = 0.5 * steps ** (2 + i)          # 0 at step 0: drawn at the floor on the log axis
        curves[kind] = {start: {"kl": stats(kl * scale), "l2": stats(steps * scale),
                                "l2_relative": stats(steps * scale / 3)}
                        for start, scale in (("real", 1.0), ("synthetic", 1.5))}
    return {"config": {"hook": "blocks.6.hook_resid_post", "later_hook": "blocks.29.hook_resid_post",
                       "kl_threshold": 0.1}, "step_unit": 12.5, "steps": steps.tolist(), "curves": curves}


def test_writes_a_png(tmp_path):
    out = tmp_path / "figs" / "perturbation_curves.png"
    assert perturbation_curves(fake_result(), str(out)) == str(out)
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["perturbation_curves.png"]  # no temporary file left


def test_missing_values_and_all_zero_kl(tmp_path):
    result = fake_result(kinds=("real",), n_steps=3)
    result["curves"]["real"]["real"]["kl"]["p50"] = [0.0, None, 0.0]   # a None (NaN in the JSON) is skipped
    result["curves"]["real"]["synthetic"]["kl"] = {k: [0.0] * 3 for k in result["curves"]["real"]["real"]["kl"]}
    out = tmp_path / "z.png"
    perturbation_curves(result, str(out))
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_rejects_what_is_not_a_perturb_result(tmp_path):
    with pytest.raises(InterplabError, match="not an `interplab perturb` result"):
        perturbation_curves({"metrics": {}}, str(tmp_path / "x.png"))
    with pytest.raises(InterplabError, match="no curves"):
        perturbation_curves({**fake_result(), "curves": {}}, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
