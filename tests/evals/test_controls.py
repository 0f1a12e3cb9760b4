"""Splice controls: exact norms and directions, isotropy, target covariance, seeds, zero norms, and the ε-random KL
of a linear model against its second-order formula."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.evals import (
    covariance_matched_error,
    epsilon_random,
    error_covariance_factor,
    kl_per_token,
    mean_ablation,
    mean_and_sem,
    sae_norm_patch,
    sae_output_at_original_norm,
    zero_ablation,
)


def pair(n=64, d=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    return x, x + 0.3 * torch.randn(n, d, generator=gen, dtype=dtype)


def g(seed):
    return torch.Generator().manual_seed(seed)


# ---- ε-random ------------------------------------------------------------------------------------------------
def test_epsilon_random_error_norms_are_exact():
    x, x_hat = pair(n=50, d=16)
    x, x_hat = x.reshape(5, 10, 16), x_hat.reshape(5, 10, 16)
    out = epsilon_random(x, x_hat, g(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close((out - x).norm(dim=-1), (x - x_hat).norm(dim=-1), rtol=1e-12, atol=1e-12)
    # fresh direction per token: not the SAE's error direction
    cos = torch.nn.functional.cosine_similarity(out - x, x_hat - x, dim=-1)
    assert cos.abs().mean() < 0.5


def test_epsilon_random_is_isotropic():
    n, d = 20000, 8
    x = torch.zeros(n, d, dtype=torch.float64)
    u = epsilon_random(x, x + torch.ones(n, d, dtype=torch.float64), g(1)) / d**0.5   # ‖x − x̂‖ = √d
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(n, dtype=torch.float64))
    assert u.mean(0).abs().max() < 5 / (n * d) ** 0.5                    # each coordinate: var 1/d
    cov = u.T @ u / n
    assert (cov - torch.eye(d, dtype=torch.float64) / d).abs().max() < 0.01   # E[u uᵀ] = I/d


def test_epsilon_random_seeds_and_edge_cases():
    x, x_hat = pair()
    a, b, c = (epsilon_random(x, x_hat, g(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(epsilon_random(x, x.clone(), g(0)), x)             # zero error: x itself, no NaN
    z = torch.zeros(3, 4)
    assert torch.equal(epsilon_random(z, z, g(0)), z)
    assert epsilon_random(x.float(), x_hat.float(), g(0)).dtype == torch.float32
    with pytest.raises(InterplabError, match="share a shape"):
        epsilon_random(x, x_hat[:, :3], g(0))


# ---- norm patches --------------------------------------------------------------------------------------------
def test_norm_patches_have_stated_norms_and_directions():
    x, x_hat = pair()
    p = sae_norm_patch(x, x_hat)
    torch.testing.assert_close(p.norm(dim=-1), x_hat.norm(dim=-1))
    torch.testing.assert_close(p / p.norm(dim=-1, keepdim=True), x / x.norm(dim=-1, keepdim=True))
    q = sae_output_at_original_norm(x, x_hat)
    torch.testing.assert_close(q.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(q / q.norm(dim=-1, keepdim=True), x_hat / x_hat.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(sae_norm_patch(x, x), x)
    torch.testing.assert_close(sae_output_at_original_norm(x, x), x)


def test_norm_patches_with_zero_norms():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    p, q = sae_norm_patch(x, x_hat), sae_output_at_original_norm(x, x_hat)
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    assert p.tolist() == [[0.0, 0.0], [0.0, 0.0]]                 # no direction to keep: 0; x̂ = 0: norm 0
    assert q.tolist() == [[0.0, 0.0], [0.0, 0.0]]


# ---- covariance-matched --------------------------------------------------------------------------------------
def shaped_errors(n, d=6, seed=3):
    A = torch.randn(d, d, generator=g(100), dtype=torch.float64) * torch.linspace(0.1, 2.0, d, dtype=torch.float64)
    e = torch.randn(n, d, generator=g(seed), dtype=torch.float64) @ A.T
    return e, A @ A.T                                                                 # samples, true Σ


def test_error_covariance_factor_reproduces_covariance():
    e, _ = shaped_errors(5000)
    L = error_covariance_factor(e, ridge=0.0)
    torch.testing.assert_close(L @ L.T, torch.cov(e.T), rtol=1e-9, atol=1e-9)
    L2 = error_covariance_factor(e.reshape(50, 100, 6), center=False, ridge=0.0)     # second moment
    torch.testing.assert_close(L2 @ L2.T, e.T @ e / e.shape[0], rtol=1e-9, atol=1e-9)
    singular = torch.randn(100, 1, generator=g(0)).expand(100, 5)                    # rank 1
    Ls = error_covariance_factor(singular)
    assert Ls.dtype == torch.float32 and torch.isfinite(Ls).all()
    assert torch.linalg.eigvalsh((Ls @ Ls.T).double()).min() > 0                    # ridge: strictly PD
    with pytest.raises(InterplabError, match="at least 2"):
        error_covariance_factor(torch.zeros(1, 5))


def test_covariance_matched_errors_have_target_covariance_and_norms():
    n = 40000
    e_sae, sigma = shaped_errors(n)
    L = error_covariance_factor(e_sae)
    x = torch.randn(n, 6, generator=g(4), dtype=torch.float64)
    x_hat = x - e_sae
    raw = covariance_matched_error(x, x_hat, L, g(5), match_norm=False) - x
    assert (torch.cov(raw.T) - sigma).abs().max() < 0.05 * sigma.diagonal().max()
    matched = covariance_matched_error(x, x_hat, L, g(5)) - x
    torch.testing.assert_close(matched.norm(dim=-1), e_sae.norm(dim=-1))
    # same norms as ε-random, but directions concentrate along Σ's top eigenvector (isotropic would give 1/d)
    top = torch.linalg.eigh(sigma).eigenvectors[:, -1]
    assert ((matched / matched.norm(dim=-1, keepdim=True)) @ top).pow(2).mean() > 2 / 6
    a, b = (covariance_matched_error(x[:10], x_hat[:10], L, g(9)) for _ in range(2))
    assert torch.equal(a, b)
    assert torch.equal(covariance_matched_error(x[:10], x[:10], L, g(9)), x[:10])   # zero error stays zero
    with pytest.raises(InterplabError, match="errors_cov_factor"):
        covariance_matched_error(x, x_hat, L[:5, :5], g(0))


# ---- ablations -----------------------------------------------------------------------------------------------
def test_ablations():
    x = torch.randn(2, 3, 4)
    assert torch.equal(zero_ablation(x), torch.zeros(2, 3, 4))
    mu = torch.arange(4.0)
    out = mean_ablation(x, mu)
    assert out.shape == x.shape and torch.equal(out[1, 2], mu)
    out[0, 0, 0] = 99.0                                                              # a real tensor, not a view
    assert mu[0] == 0.0
    with pytest.raises(InterplabError, match="mean must have shape"):
        mean_ablation(x, torch.zeros(3))


# ---- ε-random KL on a linear model ---------------------------------------------------------------------------
def test_epsilon_random_kl_of_linear_model_matches_second_order_formula():
    """logits = x W. For δ = ε u, KL(p ‖ q) = ½ δᵀ F δ + O(ε³), F = W (diag p − p pᵀ) Wᵀ (the Fisher matrix);
    the O(ε³) term is odd in u and averages out, and E[u uᵀ] = I/d, so E_u[KL] = ε²/(2d) · tr F + O(ε⁴),
    tr F = Σ_v p_v ‖W_{:,v}‖² − ‖W p‖²."""
    n, d, vocab = 20000, 8, 5
    W = torch.randn(d, vocab, generator=g(10), dtype=torch.float64)
    x = torch.randn(n, 1, d, generator=g(11), dtype=torch.float64)                  # [batch=n, pos=1, d]
    eps = 0.005 + 0.015 * torch.rand(n, 1, 1, generator=g(12), dtype=torch.float64) # per-token error norms
    v = torch.randn(n, 1, d, generator=g(13), dtype=torch.float64)
    x_hat = x + eps * v / v.norm(dim=-1, keepdim=True)                              # ‖x − x̂‖ = ε
    kl = kl_per_token(x @ W, epsilon_random(x, x_hat, g(14)) @ W)                   # [n 1]
    p = (x @ W).softmax(-1)                                                          # [n 1 vocab]
    tr_f = (p * W.pow(2).sum(0)).sum(-1) - (p @ W.T).pow(2).sum(-1)                  # [n 1]
    expected = eps[..., 0] ** 2 / (2 * d) * tr_f
    diff = mean_and_sem(kl - expected)
    assert abs(diff.mean) < 4 * diff.sem + 1e-3 * expected.mean().item()
    assert kl.mean().item() == pytest.approx(expected.mean().item(), rel=0.03)
