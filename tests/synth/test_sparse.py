"""Sparse features in superposition: exact probabilities, binomial activation rates, exact x, seeded resumable
streams, the copula's preserved marginals and known joint law, and the error messages."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from interplab.errors import InterplabError
from interplab.synth import SparseFeatures, SparseFeaturesConfig, SyntheticSource, feature_probabilities


def tiny(**kw) -> SparseFeatures:
    return SparseFeatures(SparseFeaturesConfig(**{"n_features": 32, "d": 16, "mean_active": 4.0, "decay": 0.9, **kw}))


def within_binomial(rates: torch.Tensor, p: torch.Tensor, n: int, sigmas: float = 5.0) -> bool:
    """|rate − p| <= sigmas·sqrt(p(1−p)/n) (+ a grain for p near 0 or 1), for every feature."""
    tol = sigmas * torch.sqrt(p * (1 - p) / n) + 1e-9
    return bool(((rates.double() - p).abs() <= tol).all())


def test_probabilities_sum_exactly_and_decay_geometrically():
    p = feature_probabilities(512, 5.0, 0.99)
    assert p.dtype == torch.float64
    assert float(p.sum()) == pytest.approx(5.0, abs=1e-12)
    torch.testing.assert_close(p[1:] / p[:-1], torch.full((511,), 0.99, dtype=torch.float64), rtol=1e-12, atol=0)
    flat = feature_probabilities(10, 2.5, 1.0)
    torch.testing.assert_close(flat, torch.full((10,), 0.25, dtype=torch.float64), rtol=0, atol=1e-15)


def test_probabilities_clip_at_one_and_renormalise_the_rest():
    # 9 features clipped, the 10th carries the remaining 0.5.
    torch.testing.assert_close(feature_probabilities(10, 9.5, 0.5),
                               torch.tensor([1.0] * 9 + [0.5], dtype=torch.float64), rtol=0, atol=1e-15)
    p = feature_probabilities(20, 5.0, 0.5)
    clipped = int((p == 1).sum())
    assert clipped >= 1 and bool((p[:clipped] == 1).all()) and bool((p[clipped:] < 1).all())
    assert float(p.sum()) == pytest.approx(5.0, abs=1e-12)
    torch.testing.assert_close(p[clipped + 1:] / p[clipped:-1], torch.full((19 - clipped,), 0.5, dtype=torch.float64))
    assert bool((feature_probabilities(7, 7.0, 0.8) == 1).all())  # mean_active = G: every feature always on


def test_activation_rates_match_probabilities():
    gen, n = tiny(), 20_000
    b = gen.sample(n, torch.Generator().manual_seed(0))
    assert within_binomial(b.active.float().mean(0), gen.probs, n)
    assert float(b.active.float().sum(1).mean()) == pytest.approx(4.0, abs=0.1)


def test_coefficients_and_data_are_exact():
    gen = tiny()
    b = gen.sample(500, torch.Generator().manual_seed(1))
    assert b.x.shape == (500, 16) and b.coeffs.shape == b.active.shape == (500, 32) and b.active.dtype == torch.bool
    assert bool((b.coeffs[b.active] > 0).all()) and bool((b.coeffs[b.active] <= 1).all())
    assert bool((b.coeffs[~b.active] == 0).all())
    assert torch.equal(b.x, b.coeffs @ gen.features)
    torch.testing.assert_close(gen.features.norm(dim=1), torch.ones(32))


def test_noise_has_the_asked_standard_deviation():
    gen = tiny(noise_std=0.1)
    b = gen.sample(4000, torch.Generator().manual_seed(2))
    resid = b.x - b.coeffs @ gen.features
    assert float(resid.std()) == pytest.approx(0.1, rel=0.02)


def test_same_seed_same_batches_other_index_or_seed_different():
    a, b = tiny(seed=3), tiny(seed=3)
    for ba, bb in zip(itertools.islice(a.batches(8), 3), itertools.islice(b.batches(8), 3)):
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.coeffs, bb.coeffs)
    first, second = itertools.islice(a.batches(8), 2)
    assert not torch.equal(first.coeffs, second.coeffs)
    assert not torch.equal(a.features, tiny(seed=4).features)


def test_batches_resume_at_any_index():
    gen = tiny(correlated=True)
    full = list(itertools.islice(gen.batches(8), 6))
    tail = list(itertools.islice(gen.batches(8, start=4), 2))
    for x, y in zip(full[4:], tail):
        assert torch.equal(x.x, y.x) and torch.equal(x.active, y.active)


def test_source_adapter_yields_the_data():
    gen = tiny()
    src = SyntheticSource(gen, batch_size=8)
    assert src.d_in == 16
    xs = list(itertools.islice(src.batches(start=2), 2))
    ref = list(itertools.islice(gen.batches(8, start=2), 2))
    assert all(torch.equal(x, r.x) for x, r in zip(xs, ref))


def test_correlation_matrix_is_a_correlation_matrix():
    gen = tiny(correlated=True, correlation_strength=0.7, correlation_rank=3)
    S = gen.correlation_matrix
    torch.testing.assert_close(S.diagonal(), torch.ones(32))
    torch.testing.assert_close(S, S.T)
    assert float(torch.linalg.eigvalsh(S.double()).min()) >= 0.3 - 1e-6  # (1 − ρ)·I plus a PSD part
    assert float((S - torch.eye(32)).abs().max()) <= 0.7 + 1e-6


def test_correlated_variant_keeps_marginals_and_has_the_copula_joint_law():
    from scipy.stats import multivariate_normal, norm

    rho, n = 0.9, 40_000
    gen = tiny(n_features=8, d=4, mean_active=2.0, decay=0.8, correlated=True, correlation_strength=rho,
               correlation_rank=1)
    b = gen.sample(n, torch.Generator().manual_seed(5))
    assert within_binomial(b.active.float().mean(0), gen.probs, n)
    # rank 1: Σ_ij = ±ρ. Check the joint rate of every pair against the Gaussian copula's exact P(both active).
    S, p = gen.correlation_matrix.double(), gen.probs
    both = (b.active.double().T @ b.active.double()) / n
    for i, j in itertools.combinations(range(8), 2):
        q = norm.ppf([float(p[i]), float(p[j])])
        exact = multivariate_normal(mean=[0, 0], cov=[[1, float(S[i, j])], [float(S[i, j]), 1]]).cdf(q)
        assert abs(float(both[i, j]) - exact) <= 5 * math.sqrt(exact * (1 - exact) / n) + 1e-3
    # Positively correlated Gaussians → positively correlated activity (and vice versa), far beyond chance.
    ind = b.active.double()
    corr = torch.corrcoef(ind.T)
    off = ~torch.eye(8, dtype=torch.bool)
    assert bool((torch.sign(corr[off]) == torch.sign(S[off])).all())
    assert float(corr[off].abs().min()) > 0.1


def test_uncorrelated_variant_has_independent_features():
    n = 40_000
    gen = tiny(n_features=8, d=4, mean_active=2.0, decay=0.8)
    b = gen.sample(n, torch.Generator().manual_seed(6)).active.double()
    both, p = (b.T @ b) / n, gen.probs
    expected = torch.outer(p, p)
    tol = 5 * torch.sqrt(expected * (1 - expected) / n) + 1e-3
    off = ~torch.eye(8, dtype=torch.bool)
    assert bool(((both - expected).abs() <= tol)[off].all())


@pytest.mark.parametrize("kw, shown", [
    ({"n_features": 0}, "n_features must be an integer >= 1, got 0"),
    ({"d": 0}, "d must be an integer >= 1, got 0"),
    ({"mean_active": 40.0}, "mean_active must be in (0, n_features=32], got 40.0"),
    ({"mean_active": 0.0}, "got 0.0"),
    ({"decay": 0.0}, "decay must be in (0, 1], got 0.0"),
    ({"decay": 1.5}, "decay must be in (0, 1], got 1.5"),
    ({"noise_std": -1.0}, "noise_std must be >= 0, got -1.0"),
    ({"correlation_strength": 2.0}, "correlation_strength must be in [0, 1], got 2.0"),
    ({"correlation_rank": 0}, "correlation_rank must be an integer >= 1, got 0"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"n_features": 512, "decay": 1e-5, "mean_active": 100.0}, "decay=1e-05 is too steep for mean_active=100.0"),
])
def test_bad_configs_raise_naming_the_value(kw, shown):
    with pytest.raises(InterplabError) as e:
        tiny(**kw)
    assert shown in str(e.value)


def test_bad_sample_arguments_raise():
    gen = tiny()
    with pytest.raises(InterplabError, match="n must be an integer >= 1, got 0"):
        gen.sample(0, torch.Generator())
    with pytest.raises(InterplabError, match="batch_size must be an integer >= 1, got 0"):
        next(gen.batches(0))
