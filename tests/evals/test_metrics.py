"""Metrics against hand-computed answers: reconstruction, sparsity, KL, CE, CE-loss-recovered and error bars."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.errors import InterplabError
from interplab.evals import (
    ce_loss_per_token,
    ce_loss_recovered,
    firing_counts,
    kl_per_token,
    mean_and_sem,
    ratio_with_sem,
    reconstruction_metrics,
    sparsity_metrics,
)
from interplab.evals.metrics import clean_log_probs, kl_and_ce_per_token


# ---- reconstruction ------------------------------------------------------------------------------------------
def test_perfect_reconstruction():
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(0))
    m = reconstruction_metrics(x, x.clone())
    assert m["mse"] == 0.0
    assert m["explained_variance"] == pytest.approx(1.0)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12)
    for key in ("cossim", "l2_ratio", "relative_reconstruction_bias"):
        assert m[key] == pytest.approx(1.0)
    assert m["l2_norm_in"] == pytest.approx(m["l2_norm_out"])


def test_reconstruction_by_hand_with_zero_token():
    # token 1: x=(2,0), x̂=(1,0); token 2: both zero (no NaN: cos and ratio count as 1)
    m = reconstruction_metrics(torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert m["mse"] == pytest.approx(0.5)                       # (1 + 0) / 2
    assert m["explained_variance"] == pytest.approx(0.5)        # x̄ = (1,0), Var = (1 + 1)/2 = 1
    assert m["cossim"] == pytest.approx(1.0)
    assert m["l2_norm_in"] == pytest.approx(1.0) and m["l2_norm_out"] == pytest.approx(0.5)
    assert m["l2_ratio"] == pytest.approx(0.75)                 # (0.5 + 1) / 2
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5)  # mean ‖x̂‖² / mean ⟨x, x̂⟩ = 0.5 / 1
    assert all(not math.isnan(v) for v in m.values())


def test_explained_variance_is_relative_to_the_mean():
    # predicting the mean explains nothing, although the vectors are almost equal (legacy-vs-zero would say 0.99)
    x = torch.tensor([[10.0, 0.0], [12.0, 0.0]])
    m = reconstruction_metrics(x, torch.tensor([[11.0, 0.0], [11.0, 0.0]]))
    assert m["mse"] == pytest.approx(1.0)
    assert m["explained_variance"] == pytest.approx(0.0)
    assert m["fvu"] == pytest.approx(1.0)


def test_orthogonal_reconstruction_and_errors():
    m = reconstruction_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
    assert m["cossim"] == pytest.approx(0.0) and m["l2_ratio"] == pytest.approx(3.0)
    assert m["mse"] == pytest.approx(10.0)
    with pytest.raises(InterplabError, match="same shape"):
        reconstruction_metrics(torch.zeros(2, 3), torch.zeros(2, 4))


# ---- sparsity ------------------------------------------------------------------------------------------------
LATENTS = torch.tensor([[1.0, 0.0, 0.0, -2.0], [0.0, 0.0, 0.0, 3.0], [0.5, 0.0, 0.0, 0.0]])


def test_sparsity_by_hand():
    m = sparsity_metrics(LATENTS)
    assert m["l0"] == pytest.approx(4 / 3)
    assert m["l1"] == pytest.approx(6.5 / 3)
    assert m["dead_fraction"] == pytest.approx(0.5)             # latents 1 and 2 never fire
    assert m["dense_fraction"] == pytest.approx(0.5)            # latents 0 and 3 fire on 2/3 > 10% of tokens
    hist = m["feature_density_hist"]
    edges, counts = hist["log10_edges"], hist["counts"]
    assert len(edges) == len(counts) + 1 and edges[0] == -1.0 and edges[-1] == 0.0
    assert sum(counts) == 2                                     # dead latents are not in the histogram
    (i,) = [j for j, c in enumerate(counts) if c]
    assert edges[i] <= math.log10(2 / 3) < edges[i + 1]


def test_sparsity_with_accumulated_counts():
    counts = firing_counts(LATENTS)
    assert counts.n_tokens == 3 and counts.counts.tolist() == [2, 0, 0, 2]
    merged = counts.merge(firing_counts(LATENTS))
    assert merged.n_tokens == 6 and merged.counts.tolist() == [4, 0, 0, 4]
    m = sparsity_metrics(LATENTS, (1000, torch.tensor([2, 0, 0, 200])))
    assert m["dead_fraction"] == pytest.approx(0.5)
    assert m["dense_fraction"] == pytest.approx(0.25)           # only 200/1000 > 0.1
    assert m["feature_density_hist"]["log10_edges"][0] == -3.0
    assert sum(m["feature_density_hist"]["counts"]) == 2
    assert m["l0"] == pytest.approx(4 / 3)                      # l0/l1 still from the latents given
    with pytest.raises(InterplabError, match="firing counts"):
        sparsity_metrics(LATENTS, (10, torch.zeros(3)))


# ---- KL and CE -----------------------------------------------------------------------------------------------
def test_kl_on_three_token_vocabulary():
    clean = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]]))
    patched = torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]]])) + 7.0  # a shift changes nothing
    kl = kl_per_token(clean, patched)
    assert kl.shape == (1, 2)
    assert kl[0, 0].item() == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5))  # = 0.25 log 2
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_kl_with_zero_probability_and_identity():
    clean = torch.tensor([[[0.0, -math.inf, 0.0]]])           # p = (½, 0, ½)
    kl = kl_per_token(clean, torch.zeros(1, 1, 3))              # q uniform
    assert kl.item() == pytest.approx(math.log(1.5))
    logits = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(1))
    assert torch.equal(kl_per_token(logits, logits), torch.zeros(2, 4))   # perfect splice: KL 0
    assert kl_per_token(logits.half(), logits.half()).dtype == torch.float32
    with pytest.raises(InterplabError, match="differ in shape"):
        kl_per_token(logits, logits[:, :3])


def test_ce_loss_per_token_by_hand():
    logits = torch.log(torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    ce = ce_loss_per_token(logits, torch.tensor([[0, 1, 2]]))
    assert ce.shape == (1, 2)
    assert ce[0].tolist() == pytest.approx([-math.log(0.5), -math.log(0.8)])
    with pytest.raises(InterplabError, match="pos ≥ 2"):
        ce_loss_per_token(logits[:, :1], torch.tensor([[0]]))


def test_ce_loss_recovered():
    assert ce_loss_recovered(2.0, 2.0, 5.0) == pytest.approx(1.0)   # perfect reconstruction
    assert ce_loss_recovered(2.0, 5.0, 5.0) == pytest.approx(0.0)   # spliced == zero-ablated
    assert ce_loss_recovered(2.0, 2.75, 5.0) == pytest.approx(0.75)
    assert ce_loss_recovered(torch.tensor(2.0), torch.tensor(6.0), torch.tensor(5.0)) == pytest.approx(-1 / 3)
    assert math.isnan(ce_loss_recovered(2.0, 2.5, 2.0))
    with pytest.raises(InterplabError, match="undefined"):
        ce_loss_recovered(2.0, 2.5, 2.0 + 1e-9, strict=True)


# ---- error bars ----------------------------------------------------------------------------------------------
def test_mean_and_sem_known_sample():
    mean, sem = mean_and_sem(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert sem == pytest.approx(math.sqrt(5 / 3) / 2)          # s² = 5/3 (n − 1), sem = s / √4
    assert math.isnan(mean_and_sem(torch.tensor([3.0])).sem)
    with pytest.raises(InterplabError):
        mean_and_sem(torch.tensor([]))


def test_ratio_with_sem_matches_delta_method_and_simulation():
    gen = torch.Generator().manual_seed(2)
    n = 400
    b = 1.0 + torch.rand(n, generator=gen, dtype=torch.float64)
    a = 3.0 * b + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)      # paired, correlated
    r, sem = ratio_with_sem(a, b)
    am, bm = a.mean(), b.mean()
    va, vb = a.var(), b.var()
    cab = ((a - am) * (b - bm)).sum() / (n - 1)
    direct = (am / bm) ** 2 / n * (va / am**2 - 2 * cab / (am * bm) + vb / bm**2)
    assert r == pytest.approx((am / bm).item())
    assert sem == pytest.approx(direct.sqrt().item(), rel=1e-9)
    # the SEM is the spread of the ratio over repeated experiments
    reps = 3000
    B = 1.0 + torch.rand(reps, n, generator=gen, dtype=torch.float64)
    A = 3.0 * B + 0.3 * torch.randn(reps, n, generator=gen, dtype=torch.float64)
    spread = (A.mean(1) / B.mean(1)).std().item()
    assert sem == pytest.approx(spread, rel=0.1)
    with pytest.raises(InterplabError, match="denominator"):
        ratio_with_sem(a, torch.zeros(n))


def test_fused_kl_and_ce_equal_the_separate_metrics():
    gen = torch.Generator().manual_seed(0)
    clean, patched = torch.randn(2, 5, 30, generator=gen) * 3, torch.randn(2, 5, 30, generator=gen) * 3
    clean[0, 0, 3] = -1e4  # a token with P_clean = 0 in float32
    tokens = torch.randint(0, 30, (2, 5), generator=gen)
    kl, ce = kl_and_ce_per_token(clean_log_probs(clean), patched.clone(), tokens)
    torch.testing.assert_close(kl, kl_per_token(clean, patched), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_loss_per_token(patched, tokens))
    kl_self, _ = kl_and_ce_per_token(clean_log_probs(clean), clean.clone(), tokens)
    assert kl_self.abs().max() < 1e-5
