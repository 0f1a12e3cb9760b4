"""Scoring against planted features: known answers for the true, a part-replaced, a permuted and a random
dictionary, for codes equal to the truth, and for PCA on data of lower rank than d."""

from __future__ import annotations

import json

import pytest
import torch

from interplab.errors import InterplabError
from interplab.synth import (
    Matching,
    SparseFeatures,
    SparseFeaturesConfig,
    hungarian_match,
    max_cosines,
    mmcs,
    pair_scores,
    pca_directions,
    random_dictionary,
    recovery_rate,
    score_dictionary,
    score_sae,
    score_with_controls,
)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return random_dictionary(n, d, seed)


def test_true_dictionary_scores_one_under_permutation_and_positive_scaling():
    F = unit(40, 32, 0)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(40, generator=g)
    W = F[perm] * (0.5 + 2.5 * torch.rand(40, 1, generator=g))
    s = score_dictionary(W, F)
    for key in ("mmcs_true", "mmcs_learned", "matched_cosine"):
        assert s[key] == pytest.approx(1.0, abs=1e-6)
    assert s["recovery"] == 1.0 and s["matched_recovery"] == 1.0
    assert mmcs(W, F) == pytest.approx((1.0, 1.0), abs=1e-6) and recovery_rate(W, F) == 1.0


def test_replacing_a_known_fraction_of_rows_scores_exactly_that_recovery():
    # True features in the first 48 coordinates; replacements in the last 16, so their cosines with the truth are 0.
    F = torch.zeros(40, 64)
    F[:, :48] = unit(40, 48, 2)
    W = F.clone()
    lost = torch.arange(0, 40, 4)                                  # 10 of 40 rows
    W[lost] = 0
    W[lost, 48:] = unit(10, 16, 3)
    assert recovery_rate(W, F, threshold=0.9) == 0.75
    mc = max_cosines(W, F)
    assert set(torch.nonzero(mc.true_max < 0.9).flatten().tolist()) == set(lost.tolist())
    assert bool((mc.learned_max[lost] == 0).all())


def test_random_dictionary_in_high_dimension_scores_low():
    # Each cosine of independent uniform unit vectors in d = 1024 has P(|cos| >= t) <= 2·exp(−d t²/2); at t = 0.2
    # that is 2.5e-9, and a union bound over the 64·64 pairs leaves ~1e-5 chance of any cosine reaching 0.2.
    F, W = unit(64, 1024, 4), unit(64, 1024, 5)
    t, learned = mmcs(W, F)
    assert t < 0.2 and learned < 0.2 and recovery_rate(W, F) == 0.0


def test_blocked_max_cosines_equal_the_dense_maxima():
    F, W = unit(23, 8, 6), unit(17, 8, 7)
    cos = F @ W.T
    for block in (1, 7, 10_000):
        mc = max_cosines(W, F, block_elements=block)
        torch.testing.assert_close(mc.true_max, cos.max(1).values)
        torch.testing.assert_close(mc.learned_max, cos.max(0).values)
        assert torch.equal(mc.true_arg, cos.argmax(1)) and torch.equal(mc.learned_arg, cos.argmax(0))


def test_hungarian_matching_recovers_a_permutation():
    F = unit(30, 64, 8)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(9))
    W = torch.cat([F[perm] + 0.05 * unit(30, 64, 10), unit(12, 64, 11)])   # noisy rows and 12 distractors
    m = hungarian_match(W, F)
    assert torch.equal(m.true_idx, torch.arange(30))
    assert torch.equal(m.learned_idx, torch.argsort(perm))                # W[j] ≈ F[perm[j]]
    assert bool((m.cosine > 0.99).all())


def test_codes_equal_to_the_truth_give_f1_and_correlation_one():
    gen = SparseFeatures(SparseFeaturesConfig(n_features=16, d=12, mean_active=3.0, decay=0.9))
    b = gen.sample(2000, torch.Generator().manual_seed(0))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    s = score_dictionary(gen.features[perm], gen.features, codes=3 * b.coeffs[:, perm], coeffs=b.coeffs)
    assert s["f1"] == pytest.approx(1.0, abs=1e-6) and s["correlation"] == pytest.approx(1.0, abs=1e-6)


def test_pair_scores_on_a_hand_example():
    codes = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 2.0], [0.0, 2.0]])
    coeffs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    ps = pair_scores(codes, coeffs, Matching(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2)))
    # pair 0: fired {0, 2}, present {0, 1}: TP 1, F1 = 2/4; Pearson([1,0,1,0], [1,1,0,0]) = 0.
    # pair 1: feature never present, latent fires twice: F1 = 0; coefficient constant → correlation 0.
    torch.testing.assert_close(ps.f1, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(ps.correlation, torch.tensor([0.0, 0.0]))


def test_pca_control_recovers_the_span_of_fewer_features_than_d():
    gen = SparseFeatures(SparseFeaturesConfig(n_features=6, d=20, mean_active=2.0, decay=0.9))
    x = gen.sample(3000, torch.Generator().manual_seed(0)).x
    V = pca_directions(x, 20).double()
    torch.testing.assert_close(V @ V.T, torch.eye(20, dtype=torch.float64), atol=1e-5, rtol=0)
    F = gen.features.double()
    top = V[:6]
    torch.testing.assert_close(F @ top.T @ top, F, atol=1e-5, rtol=0)      # every feature inside the top-6 span
    centred = x.double() - x.double().mean(0)
    assert float((centred @ V[6:].T).norm()) < 1e-4 * float(centred.norm())  # no variance beyond it
    assert bool((top @ x.double().mean(0) > 0).all())                        # oriented towards the data's mean


def test_controls_sit_below_the_true_dictionary_and_are_json():
    gen = SparseFeatures(SparseFeaturesConfig(n_features=48, d=32, mean_active=3.0, decay=0.95))
    b = gen.sample(1500, torch.Generator().manual_seed(0))
    s = score_with_controls(gen.features, gen.features, b.x, codes=b.coeffs, coeffs=b.coeffs)
    json.dumps(s)
    assert set(s) == {"learned", "random", "pca"}
    assert s["learned"]["recovery"] == 1.0 and s["learned"]["f1"] == pytest.approx(1.0)
    assert s["pca"]["n_learned"] == 32 and s["random"]["n_learned"] == 48
    for control in ("random", "pca"):
        assert s[control]["mmcs_true"] < 0.8 and s[control]["recovery"] < 0.2
        assert s[control]["f1"] < 0.9 and s[control]["correlation"] < 0.9


def test_score_sae_reads_the_decoder_and_the_codes():
    from interplab.sae import SAEConfig, make_sae

    gen = SparseFeatures(SparseFeaturesConfig(n_features=24, d=16, mean_active=2.0, decay=0.9))
    sae = make_sae(SAEConfig(arch="topk", d_in=16, d_sae=24, k=4))
    with torch.no_grad():
        sae.W_dec.copy_(gen.features)
    b = gen.sample(256, torch.Generator().manual_seed(0))
    alone = score_sae(sae, gen.features)
    assert alone["mmcs_true"] == pytest.approx(1.0, abs=1e-6)
    full = score_sae(sae, gen.features, b.x, b.coeffs)
    assert set(full) == {"learned", "random", "pca"} and "f1" in full["learned"]


def test_bad_inputs_raise():
    F = unit(5, 8, 0)
    with pytest.raises(InterplabError, match=r"same d, got \(5, 9\) and \(5, 8\)"):
        score_dictionary(torch.randn(5, 9), F)
    with pytest.raises(InterplabError, match="pass both codes and coeffs"):
        score_dictionary(F, F, codes=torch.ones(3, 5))
    with pytest.raises(InterplabError, match=r"threshold is a cosine, it must be in \[-1, 1\], got 2"):
        score_dictionary(F, F, threshold=2)
    with pytest.raises(InterplabError, match=r"codes must be \[n, 5\] and coeffs \[n, 5\]"):
        score_dictionary(F, F, codes=torch.ones(3, 4), coeffs=torch.ones(3, 5))
