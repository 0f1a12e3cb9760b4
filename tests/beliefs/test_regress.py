"""`beliefs regress`: the compressed weighted fit equals a plain least-squares fit on every point, an exactly affine
map is recovered, the shuffle control behaves as a null, and bad input is a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interplab.beliefs import all_sequences, belief_states, make_process
from interplab.beliefs.configs import BeliefRegressConfig, BeliefTrainConfig
from interplab.beliefs.regress import (
    design,
    fit_target,
    make_points,
    run_regress,
    sequences,
)
from interplab.beliefs.train import train_beliefs
from interplab.errors import InterplabError


def mess3_points(ctx: int = 4, weighted: bool = False, folds: int = 3):
    proc = make_process("mess3")
    tokens, probs = all_sequences(proc, ctx)
    beliefs = belief_states(proc, tokens)
    w = probs if weighted else torch.ones(len(tokens), dtype=torch.float64)
    return tokens, beliefs, w, make_points(tokens, beliefs, w, folds, seed=0)


def prefix_features(tokens: torch.Tensor, d: int, seed: int = 0) -> torch.Tensor:
    """[m, L, d] features that depend only on each prefix (like a causal model's activations), random otherwise."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(4 ** tokens.shape[1] + 1, d, generator=gen, dtype=torch.float64)
    code = torch.zeros(len(tokens), dtype=torch.int64)
    out = []
    for j in range(tokens.shape[1]):
        code = code * 3 + tokens[:, j] + 1
        out.append(table[code % len(table)] + j)
    return torch.stack(out, 1)


def all_cols(X):
    return torch.arange(X.shape[1] + 1)


@pytest.mark.parametrize("weighted", [False, True])
def test_compressed_fit_equals_plain_least_squares_on_every_point(weighted):
    tokens, beliefs, w, points = mess3_points(weighted=weighted)
    feats = prefix_features(tokens, 5)
    X = feats[points.sequence, points.position]
    fit = fit_target(design(X, points, 3), all_cols(X), points, controls=False, shuffles=0, seed=0)
    # Plain weighted least squares with an intercept on all 81 × 4 points, by numpy.
    A = np.c_[feats.reshape(-1, 5).numpy(), np.ones(len(tokens) * 4)]
    Y = beliefs.reshape(-1, 3).numpy()
    pw = np.repeat(w.numpy(), 4)
    beta = np.linalg.lstsq(A * np.sqrt(pw)[:, None], Y * np.sqrt(pw)[:, None], rcond=None)[0]
    err = (A @ beta - Y) ** 2
    assert len(points.weight) < len(pw)                              # it did compress
    assert fit.mse == pytest.approx((pw[:, None] * err).sum() / pw.sum() / 3, rel=1e-9)
    ybar = (pw[:, None] * Y).sum(0) / pw.sum()
    assert fit.r2 == pytest.approx(1 - (pw[:, None] * err).sum() / (pw[:, None] * (Y - ybar) ** 2).sum(), rel=1e-9)


def test_an_exactly_affine_map_is_recovered_even_through_redundant_directions():
    _, _, _, points = mess3_points()
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    X = points.beliefs @ M + 0.5          # rank 2 + constant: most directions are redundant
    fit = fit_target(design(X, points, 3), all_cols(X), points, controls=True, shuffles=5, seed=0)
    assert fit.mse < 1e-20 and fit.cv_mse < 1e-20 and fit.r2 == pytest.approx(1.0)
    assert min(fit.shuffle_mse) > 0.05 and fit.p_value == pytest.approx(1 / 6)


def test_shuffle_control_on_unrelated_data_is_not_significant():
    # Independent, distinct points (no shared prefixes): beliefs and activations are exchangeable under the null.
    gen = torch.Generator().manual_seed(3)
    m = 3000
    tokens = torch.randperm(m, generator=gen)[:, None]
    beliefs = torch.randn(m, 1, 3, generator=gen, dtype=torch.float64).softmax(-1)
    points = make_points(tokens, beliefs, torch.ones(m, dtype=torch.float64), 5, seed=0)
    X = torch.randn(m, 4, generator=gen, dtype=torch.float64)[points.sequence]
    fit = fit_target(design(X, points, 5), all_cols(X), points, controls=True, shuffles=20, seed=0)
    assert fit.p_value > 0.1 and abs(fit.r2) < 0.01
    assert fit.mse == pytest.approx(np.mean(fit.shuffle_mse), rel=0.01) and fit.cv_mse >= fit.mse


def test_the_shuffle_control_sits_at_the_per_coordinate_belief_variance():
    # The identity behind the MSE definition: a fit that learns nothing predicts the mean belief, so the shuffle
    # control's MSE is the per-coordinate variance over all points (0.1112 for Mess3 at ctx 10 — the paper's 0.111).
    tokens, beliefs, w, points = mess3_points(ctx=6)
    X = prefix_features(tokens, 4)[points.sequence, points.position]
    fit = fit_target(design(X, points, 5), all_cols(X), points, controls=True, shuffles=10, seed=0)
    variance = float(beliefs.reshape(-1, 3).var(0, unbiased=False).mean())
    assert np.mean(fit.shuffle_mse) == pytest.approx(variance, rel=0.01)


def test_too_many_sequences_is_an_error_offering_sampling():
    proc = make_process("mess3")
    with pytest.raises(InterplabError, match=r"3\^20 = 3,486,784,401 sequences.*--sample N"):
        sequences(proc, 20, BeliefRegressConfig())
    tokens, w = sequences(proc, 20, BeliefRegressConfig(sample=50))
    assert tokens.shape == (50, 20) and float(w.sum()) == 50
    with pytest.raises(InterplabError, match="already drawn in proportion"):
        BeliefRegressConfig(sample=50, weighted=True).validate()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("regress") / "run"
    train_beliefs(BeliefTrainConfig(process="mess3", layers=2, d_model=16, heads=1, ctx=4, tokens=6400,
                                    batch_size=32, lr=1e-2, checkpoints=[1280], eval_sequences=100, out=str(out),
                                    progress=False))
    return out


def test_regress_a_tiny_run_end_to_end(tiny_run):
    result = run_regress(BeliefRegressConfig(run=str(tiny_run), shuffles=4, figures=False), progress=False)
    saved = json.loads((tiny_run / "regress.json").read_text())
    assert saved["n_points"] == 81 * 4 and [row["tokens"] for row in saved["curve"]] == [1280, 6400]
    assert list(result["final"]) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                     "blocks.1.hook_resid_post", "concat"]
    concat = result["final"]["concat"]
    # Concatenating can only fit at least as well in-sample as any of its parts.
    assert all(concat["mse"] <= f["mse"] + 1e-12 for f in result["final"].values())
    assert concat["mse"] < min(concat["shuffle_mse"]) and concat["p_value"] == pytest.approx(0.2)
    sampled = run_regress(BeliefRegressConfig(run=str(tiny_run), sample=40, hooks=["blocks.1.hook_resid_post"],
                                              checkpoint=[6400], shuffles=0, figures=False,
                                              out=str(tiny_run / "s.json")), progress=False)
    assert list(sampled["final"]) == ["blocks.1.hook_resid_post"] and sampled["n_points"] == 160


def test_regress_draws_its_figures_into_the_runs_figures_folder(tiny_run):
    result = run_regress(BeliefRegressConfig(run=str(tiny_run), checkpoint=[6400], shuffles=0,
                                             out=str(tiny_run / "f.json")), progress=False)
    assert set(result["figures"]) == {"simplex", "simplex_concat", "mse_curve", "per_layer"}
    for path in result["figures"].values():
        assert path.startswith(f"{tiny_run}/figures/") and open(path, "rb").read(4) == b"\x89PNG"


@pytest.mark.parametrize("overrides, message", [
    ({"hooks": ["blocks.7.hook_resid_post"]}, r"unknown hook name.*blocks.7.hook_resid_post"),
    ({"hooks": ["blocks.0.attn.hook_pattern"]}, "attention patterns"),
    ({"checkpoint": [999]}, r"no checkpoint at \[999\] tokens.*saved: 1280, 6400"),
])
def test_bad_regress_input_is_a_clear_error(tiny_run, overrides, message):
    with pytest.raises(InterplabError, match=message):
        run_regress(BeliefRegressConfig(run=str(tiny_run), figures=False, **overrides), progress=False)


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(InterplabError, match="holds no beliefs train run"):
        run_regress(BeliefRegressConfig(run=str(tmp_path)), progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "toy train", "config": {"task": "ov-coherent"}}))
    with pytest.raises(InterplabError, match="not a beliefs train run's config"):
        run_regress(BeliefRegressConfig(run=str(tmp_path)), progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "beliefs train", "config": {"ctx": 4}}))
    with pytest.raises(InterplabError, match="holds no trained model yet"):   # started, no checkpoint yet
        run_regress(BeliefRegressConfig(run=str(tmp_path)), progress=False)
