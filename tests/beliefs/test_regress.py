"""`beliefs regress`: the compressed weighted fit equals a plain least-squares fit on every point, an exactly affine
map is recovered, the shuffle control behaves as a null, and bad input is a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interplab.beliefs import all_sequences, belief_states, make_process, next_token_probabilities
from interplab.beliefs.configs import BeliefRegressConfig, BeliefTrainConfig
from interplab.beliefs.regress import (
    design,
    fit_target,
    make_points,
    next_token_control,
    run_regress,
    sequences,
)
from interplab.beliefs.train import train_beliefs
from interplab.errors import InterplabError


def mess3_points(ctx: int = 4, weighted: bool = False, folds: int = 3, process: str = "mess3"):
    proc = make_process(process)
    tokens, probs = all_sequences(proc, ctx)
    tokens, probs = tokens[probs > 0], probs[probs > 0]          # RRXOR forbids some sequences
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


def lstsq_r2(X: np.ndarray, Y: np.ndarray) -> float:
    """R² (pooled over coordinates) of plain least squares with an intercept, by numpy, on every point."""
    A = np.c_[X, np.ones(len(X))]
    err = A @ np.linalg.lstsq(A, Y, rcond=None)[0] - Y
    return 1 - (err ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()


def test_the_fit_onto_next_token_probabilities_equals_plain_least_squares():
    tokens, beliefs, _, points = mess3_points()
    feats = prefix_features(tokens, 5)
    X = feats[points.sequence, points.position]
    nxt = next_token_probabilities(make_process("mess3"), points.beliefs)
    fit = fit_target(design(X, points, 3), all_cols(X), points, controls=True, shuffles=0, seed=0, Y=nxt)
    every = next_token_probabilities(make_process("mess3"), beliefs).reshape(-1, 3).numpy()
    assert fit.r2 == pytest.approx(lstsq_r2(feats.reshape(-1, 5).numpy(), every), rel=1e-9)
    assert fit.cv_mse >= fit.mse > 0


def test_on_rrxor_the_beliefs_hold_more_than_the_next_token_probabilities():
    # RRXOR emits 2 tokens, so P(next | η) is one number per belief: many beliefs share it (e.g. after "0" and after
    # "1" the next bit is fair either way, from different beliefs). A representation that IS the belief (a random
    # embedding of η) fits the beliefs and the next-token probabilities perfectly; one that holds only the
    # next-token probabilities fits the beliefs with R² < 1, even through any function of them.
    proc = make_process("rrxor")
    tokens, beliefs, _, points = mess3_points(ctx=6, process="rrxor")
    nxt = next_token_probabilities(proc, points.beliefs)
    embed = points.beliefs @ torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = design(embed, points, 3)
    on_beliefs = fit_target(d, all_cols(embed), points, controls=False, shuffles=0, seed=0)
    on_next = fit_target(d, all_cols(embed), points, controls=False, shuffles=0, seed=0, Y=nxt)
    assert on_beliefs.r2 == pytest.approx(1.0, abs=1e-9) and on_next.r2 == pytest.approx(1.0, abs=1e-9)
    control = next_token_control(points, nxt, folds=3)
    # Independent expectations on every point: numpy least squares, and the conditional mean by a Python dict.
    every_b = beliefs.reshape(-1, 5).numpy()
    every_p = next_token_probabilities(proc, beliefs).reshape(-1, 2).numpy()
    assert control["r2"] == pytest.approx(lstsq_r2(every_p, every_b), rel=1e-9)
    groups: dict[tuple, list[np.ndarray]] = {}
    for p, b in zip(np.round(every_p, 9), every_b):
        groups.setdefault(tuple(p), []).append(b)
    cond = np.array([np.mean(groups[tuple(p)], 0) for p in np.round(every_p, 9)])
    r2_any = 1 - ((cond - every_b) ** 2).sum() / ((every_b - every_b.mean(0)) ** 2).sum()
    assert control["r2_any_function"] == pytest.approx(r2_any, rel=1e-9)
    assert control["n_distinct_next_token"] == len(groups)
    assert control["n_distinct_beliefs"] == len({tuple(b) for b in np.round(every_b, 9)})
    assert control["n_distinct_next_token"] < control["n_distinct_beliefs"]
    # Measured at ctx 6: 35 beliefs, 11 next-token distributions; R² 0.273 affine, 0.456 any function.
    assert control["r2"] <= control["r2_any_function"] < 0.6


def test_for_mess3_the_next_token_probabilities_determine_the_belief():
    # Mess3's 3 × 3 emission matrix is invertible, so η = p E⁻¹ is affine in p: the control's R² is 1.
    _, _, _, points = mess3_points()
    control = next_token_control(points, next_token_probabilities(make_process("mess3"), points.beliefs), folds=3)
    assert control["r2"] == pytest.approx(1.0, abs=1e-9) and control["r2_any_function"] == pytest.approx(1.0)
    assert control["n_distinct_next_token"] == control["n_distinct_beliefs"]


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
    result = run_regress(BeliefRegressConfig(run=str(tiny_run), shuffles=4, figures=False, patch_pairs=16),
                         progress=False)
    saved = json.loads((tiny_run / "regress.json").read_text())
    assert saved["n_points"] == 81 * 4 and [row["tokens"] for row in saved["curve"]] == [1280, 6400]
    assert list(result["final"]) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                     "blocks.1.hook_resid_post", "concat"]
    concat = result["final"]["concat"]
    # The next-token control beside every fit; for Mess3 the next-token probabilities determine the belief.
    assert all({"next_token_r2", "next_token_cv_mse"} <= set(f) for f in result["final"].values())
    assert all("next_token_r2" in t for row in saved["curve"] for t in row["targets"].values())
    assert saved["next_token_control"]["r2"] == pytest.approx(1.0, abs=1e-9)
    assert saved["patch"]["hook"] == "blocks.1.hook_resid_post" and saved["patch"]["n_pairs"] == 16
    # Concatenating can only fit at least as well in-sample as any of its parts.
    assert all(concat["mse"] <= f["mse"] + 1e-12 for f in result["final"].values())
    assert concat["mse"] < min(concat["shuffle_mse"]) and concat["p_value"] == pytest.approx(0.2)
    sampled = run_regress(BeliefRegressConfig(run=str(tiny_run), sample=40, hooks=["blocks.1.hook_resid_post"],
                                              checkpoint=[6400], shuffles=0, figures=False, patch_pairs=0,
                                              out=str(tiny_run / "s.json")), progress=False)
    assert list(sampled["final"]) == ["blocks.1.hook_resid_post"] and sampled["n_points"] == 160
    assert "patch" not in sampled


def test_regress_draws_its_figures_into_the_runs_figures_folder(tiny_run):
    result = run_regress(BeliefRegressConfig(run=str(tiny_run), checkpoint=[6400], shuffles=0,
                                             out=str(tiny_run / "f.json")), progress=False)
    assert set(result["figures"]) == {"simplex", "simplex_concat", "mse_curve", "per_layer", "r2", "patch"}
    for path in result["figures"].values():
        assert path.startswith(f"{tiny_run}/figures/") and open(path, "rb").read(4) == b"\x89PNG"


@pytest.mark.parametrize("overrides, message", [
    ({"hooks": ["blocks.7.hook_resid_post"]}, r"unknown hook name.*blocks.7.hook_resid_post"),
    ({"hooks": ["blocks.0.attn.hook_pattern"]}, "attention patterns"),
    ({"checkpoint": [999]}, r"no checkpoint at \[999\] tokens.*saved: 1280, 6400"),
    ({"patch_hook": "blocks.0.hook_resid_post", "hooks": ["blocks.1.hook_resid_post"]}, "not among the regressed"),
    ({"patch_pairs": 1}, "--patch-pairs must be 0"),
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
