"""Belief-regression figures: the simplex (3 states: barycentric; more: PCA), MSE vs tokens, per layer (MSE; R² on
beliefs and next-token probabilities), belief patching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interplab.beliefs.figures import belief_figures, simplex_coordinates


def fake_result(names=("blocks.0.hook_resid_post", "concat")):
    final = {n: {"mse": 0.01 / (i + 1), "r2": 0.9, "cv_mse": 0.011 / (i + 1), "shuffle_mse_mean": 0.111,
                 "next_token_r2": 0.95} for i, n in enumerate(names)}
    curve = [{"tokens": t, "targets": {n: {"mse": 0.1 / t ** 0.3} for n in names}} for t in (1000, 10_000, 100_000)]
    return {"process": "test", "final": final, "curve": curve, "final_checkpoint": 100_000, "headline": names[0],
            "next_token_control": {"r2": 0.6, "r2_any_function": 0.7}}


def fake_patch():
    kl = {"kl_to_a": {"mean": 0.5, "sem": 0.05}, "kl_to_b": {"mean": 0.02, "sem": 0.01}}
    moved = {"kl_to_a": {"mean": 0.03, "sem": 0.01}, "kl_to_b": {"mean": 0.5, "sem": 0.05}, "moved": 0.98,
             "variance": 0.9}
    return {"hook": "blocks.0.hook_resid_post", "dim": 2, "n_pairs": 64, "before": kl, "clean_a": moved,
            "belief": moved, "readout": {**kl, "moved": 0.0, "variance": 0.0}, "random": {**kl, "moved": 0.2,
                                                                                        "variance": 0.1}}


def test_barycentric_coordinates_put_the_pure_states_on_the_triangle_corners():
    xy = simplex_coordinates(np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]]))
    assert xy[:3] == pytest.approx(np.array([[0, 0], [1, 0], [0.5, math.sqrt(3) / 2]]))
    assert xy[3] == pytest.approx(xy[:3].mean(0))


@pytest.mark.parametrize("n_states, patch", [(3, True), (5, False)])
def test_all_figures_are_written(tmp_path, n_states, patch):
    gen = torch.Generator().manual_seed(0)
    true = torch.rand(500, n_states, generator=gen, dtype=torch.float64)
    true /= true.sum(1, keepdim=True)
    predicted = true + 0.01 * torch.randn(500, n_states, generator=gen, dtype=torch.float64)
    result = {**fake_result(), **({"patch": fake_patch()} if patch else {})}
    paths = belief_figures(result, true, {"blocks.0.hook_resid_post": predicted, "concat": predicted},
                           torch.ones(500, dtype=torch.float64), str(tmp_path))
    assert set(paths) == {"simplex", "simplex_concat", "mse_curve", "per_layer", "r2"} | ({"patch"} if patch else set())
    for path in paths.values():
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
