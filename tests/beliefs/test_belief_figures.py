"""Belief-regression figures: the simplex (3 states: barycentric; more: PCA), MSE vs tokens, per layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interplab.beliefs.figures import belief_figures, simplex_coordinates


def fake_result(names=("blocks.0.hook_resid_post", "concat")):
    final = {n: {"mse": 0.01 / (i + 1), "r2": 0.9, "cv_mse": 0.011 / (i + 1), "shuffle_mse_mean": 0.111}
             for i, n in enumerate(names)}
    curve = [{"tokens": t, "targets": {n: {"mse": 0.1 / t ** 0.3} for n in names}} for t in (1000, 10_000, 100_000)]
    return {"process": "test", "final": final, "curve": curve, "final_checkpoint": 100_000, "headline": names[0]}


def test_barycentric_coordinates_put_the_pure_states_on_the_triangle_corners():
    xy = simplex_coordinates(np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]]))
    assert xy[:3] == pytest.approx(np.array([[0, 0], [1, 0], [0.5, math.sqrt(3) / 2]]))
    assert xy[3] == pytest.approx(xy[:3].mean(0))


@pytest.mark.parametrize("n_states", [3, 5])
def test_all_three_figures_are_written(tmp_path, n_states):
    gen = torch.Generator().manual_seed(0)
    true = torch.rand(500, n_states, generator=gen, dtype=torch.float64)
    true /= true.sum(1, keepdim=True)
    predicted = true + 0.01 * torch.randn(500, n_states, generator=gen, dtype=torch.float64)
    paths = belief_figures(fake_result(), true, {"blocks.0.hook_resid_post": predicted, "concat": predicted},
                           torch.ones(500, dtype=torch.float64), str(tmp_path))
    assert set(paths) == {"simplex", "simplex_concat", "mse_curve", "per_layer"}
    for path in paths.values():
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
