"""Per-token analysis: frequencies, log-spaced bins with mean ± SEM, Pearson r, on hand-made arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from interplab.errors import InterplabError
from interplab.evals.token_analysis import (
    frequency_bins,
    mean_sem,
    pearson,
    per_token_analysis,
    token_frequencies,
)


def test_token_frequencies():
    assert token_frequencies([5, 7, 5, 9, 5, 7]).tolist() == [3, 2, 3, 1, 3, 2]


def test_mean_sem_known():
    m, s = mean_sem(np.array([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5
    assert s == pytest.approx(math.sqrt(5 / 3) / 2)  # sample var of 1..4 is 5/3
    assert math.isnan(mean_sem(np.array([1.0]))[1])
    assert all(math.isnan(v) for v in mean_sem(np.array([])))


def test_pearson_known():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # Σdxdy = 4, Σdx² = Σdy² = 5
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5]))
    x, y = np.random.default_rng(0).normal(size=(2, 50))
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_frequency_bins_known():
    # log10 frequencies 0, 1, 2: with 2 bins the edges are [0, 1, 2]; 1 falls in the upper bin, 2 (the max) too
    lf = np.array([0.0, 0.0, 1.0, 2.0, 2.0])
    gap = np.array([1.0, 3.0, 10.0, 20.0, 30.0])
    bins = frequency_bins(gap, lf, n_bins=2)
    assert [b["n_tokens"] for b in bins] == [2, 3]
    assert [(b["log10_freq_lo"], b["log10_freq_hi"]) for b in bins] == [(0.0, 1.0), (1.0, 2.0)]
    assert bins[0]["mean_gap"] == 2.0 and bins[0]["sem_gap"] == pytest.approx(1.0)  # std √2 / √2
    assert bins[1]["mean_gap"] == 20.0 and bins[1]["sem_gap"] == pytest.approx(10 / math.sqrt(3))


def test_frequency_bins_empty_and_single():
    bins = frequency_bins([1.0, 2.0], [0.0, 3.0], n_bins=3)
    assert [b["n_tokens"] for b in bins] == [1, 0, 1]
    assert math.isnan(bins[1]["mean_gap"]) and math.isnan(bins[0]["sem_gap"])
    one = frequency_bins([1.0, 3.0], [1.0, 1.0], n_bins=8)  # all the same frequency → one bin
    assert len(one) == 1 and one[0]["n_tokens"] == 2 and one[0]["mean_gap"] == 2.0
    with pytest.raises(InterplabError):
        frequency_bins([1.0], [1.0, 2.0])


def test_per_token_analysis_known():
    # token 1 ×1, token 2 ×10, token 3 ×100: frequencies 10^0, 10^1, 10^2; the gap is 3 on the rare token, 2, 1
    ids = np.array([1] + [2] * 10 + [3] * 100)
    gap_by_id = {1: 3.0, 2: 2.0, 3: 1.0}
    eps = np.full(ids.size, 0.5, dtype=np.float32)
    sae = (eps + np.array([gap_by_id[i] for i in ids])).astype(np.float32)
    r = per_token_analysis({"sae": sae, "epsilon_random": eps, "sae_norm_patch": eps * 2}, ids, n_bins=2)
    assert r["n_tokens"] == 111 and r["n_token_types"] == 3
    assert r["gap_mean"] == pytest.approx((3 + 20 + 100) / 111)
    assert r["corr_gap_log10_freq"] < -0.9  # rare tokens carry the gap
    lo, hi = r["bins"]
    assert (lo["n_tokens"], lo["n_token_types"], lo["mean_gap"]) == (1, 1, pytest.approx(3.0))
    assert (hi["n_tokens"], hi["n_token_types"]) == (110, 2)
    assert hi["mean_gap"] == pytest.approx(120 / 110)
    assert hi["kl_sae_norm_patch_mean"] == pytest.approx(1.0)
    assert "input token" in r["token_choice"]
    with pytest.raises(InterplabError, match="one entry per token"):
        per_token_analysis({"sae": sae, "epsilon_random": eps}, ids[:-1])
