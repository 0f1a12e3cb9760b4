"""JumpReLU SAE: thresholds by hand, the straight-through estimator's pseudo-derivatives, the L0 penalty."""

from __future__ import annotations

import math

import pytest
import torch
from planted import sparse_data

import interplab.sae.jumprelu as jumprelu
from interplab.sae import SAEConfig, make_sae
from interplab.sae.jumprelu import _JumpReLUWithL0


def hand_sae(threshold=(0.5, 2.0, 0.1), **kw):
    """d_in=2, d_sae=3; the encoder reads x itself (JumpReLU default), so pre = x W_enc + b_enc."""
    sae = make_sae(SAEConfig(arch="jumprelu", d_in=2, d_sae=3, **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.1, 0.2]))
    sae.set_threshold(torch.tensor(threshold))
    return sae


def test_threshold_is_exp_of_log_threshold():
    sae = make_sae(SAEConfig(arch="jumprelu", d_in=2, d_sae=3, jumprelu_init_threshold=0.25))
    torch.testing.assert_close(sae.threshold, torch.full((3,), 0.25))
    torch.testing.assert_close(sae.log_threshold.data, torch.full((3,), math.log(0.25)))
    assert "log_threshold" in dict(sae.named_parameters())


def test_encode_by_hand():
    sae = hand_sae()
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    # pre = (1, 1.5, −1) and (3, 1.5, 1); θ = (0.5, 2, 0.1): a latent passes only above its own threshold
    assert sae.encode(x).tolist() == [[1.0, 0.0, 0.0], [3.0, 0.0, 1.0]]
    torch.testing.assert_close(sae(x), torch.tensor([[1.1, 0.2], [3.7, 1.0]]))
    # values just above a threshold keep their full size: the jump
    assert hand_sae(threshold=(0.99, 2.0, 0.1)).encode(x)[0, 0].item() == 1.0
    assert hand_sae(threshold=(1.0, 2.0, 0.1)).encode(x)[0, 0].item() == 0.0


def test_training_forward_by_hand():
    sae = hand_sae()
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    out = sae.training_forward(x, sparsity_coefficient=0.1)
    assert out.l0.item() == 1.5 and out.sparsity_loss.item() == pytest.approx(0.15)
    assert out.fired.tolist() == [True, False, True]
    mse = ((1.1 - 1) ** 2 + (0.2 - 2) ** 2 + (3.7 - 3) ** 2 + (1.0 - 2) ** 2) / 2
    assert out.mse.item() == pytest.approx(mse, rel=1e-5)
    assert out.loss.item() == pytest.approx(mse + 0.15, rel=1e-5)
    assert out.aux_loss.item() == 0.0
    assert sae.training_forward(x).sparsity_loss.item() == pytest.approx(1.0 * 1.5)  # cfg.l0_coefficient


def test_straight_through_estimator_by_hand():
    """With ε = 0.2, θ_0 = 1 and pre_0 = 1.05 (inside the window), θ_1 = 2 and pre_1 = 1.5 (outside):
    ∂f_0/∂θ_0 = −θ/ε = −5 and ∂H_0/∂θ_0 = −1/ε = −5, so through θ = exp(log θ) both are −5·θ_0 = −5."""
    sae = hand_sae(threshold=(1.0, 2.0, 0.1), jumprelu_bandwidth=0.2)
    x = torch.tensor([[1.05, 2.0]])  # pre = (1.05, 1.5, −0.95)
    pre = sae.pre_acts(x)

    f, l0 = _JumpReLUWithL0.apply(pre, sae.threshold, 0.2)
    (g_f,) = torch.autograd.grad(f.sum(), sae.log_threshold, retain_graph=True)
    (g_l0,) = torch.autograd.grad(l0.sum(), sae.log_threshold)
    torch.testing.assert_close(g_f, torch.tensor([-5.0, 0.0, 0.0]))
    torch.testing.assert_close(g_l0, torch.tensor([-5.0, 0.0, 0.0]))


def test_pre_activation_gradient_is_the_gate_and_l0_sends_none():
    sae = hand_sae(threshold=(1.0, 2.0, 0.1), jumprelu_bandwidth=0.2)

    pre = torch.tensor([[1.05, 1.5, 3.0]], requires_grad=True)
    f, l0 = _JumpReLUWithL0.apply(pre, sae.threshold, 0.2)
    (g,) = torch.autograd.grad(f.sum(), pre, retain_graph=True)
    assert g.tolist() == [[1.0, 0.0, 1.0]]
    (g,) = torch.autograd.grad(l0.sum(), pre)
    assert g.tolist() == [[0.0, 0.0, 0.0]]


def test_ste_matches_a_finite_difference_of_the_smoothed_step():
    """The rectangle-kernel estimator is the exact derivative of the step smoothed over the window, averaged
    over pre-activations spread across it; check the L0 part against the expected count change numerically."""
    torch.manual_seed(0)
    eps, theta = 0.1, 1.0
    pre = torch.linspace(0.0, 2.0, 20001)[:, None]  # dense grid of pre-activations, one latent

    t = torch.tensor([theta], requires_grad=True)
    _, l0 = _JumpReLUWithL0.apply(pre, t, eps)
    (g,) = torch.autograd.grad(l0.sum(), t)
    # d/dθ Σ 1[pre > θ] ≈ −(density of pre at θ) = −(number of grid points per unit)
    assert g.item() == pytest.approx(-20000 / 2.0, rel=1e-3)


def test_training_lowers_l0_with_a_larger_penalty():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def data(n):
        return sparse_data(n, gen)

    results = []
    for coef in (1e-4, 1e-1):
        sae = make_sae(SAEConfig(arch="jumprelu", d_in=32, d_sae=128, l0_coefficient=coef, jumprelu_bandwidth=0.05,
                                 jumprelu_init_threshold=0.1))
        sae.initialize(data(512), seed=0)
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for _ in range(200):
            out = sae.training_forward(data(256))
            opt.zero_grad()
            out.loss.backward()
            sae.before_optimizer_step()
            opt.step()
            sae.after_optimizer_step()
        test = data(1024)
        with torch.no_grad():
            fvu = ((sae(test) - test) ** 2).sum() / ((test - test.mean(0)) ** 2).sum()
            results.append(((sae.encode(test) > 0).float().sum(-1).mean().item(), fvu.item()))
    (l0_small, fvu_small), (l0_large, _) = results
    assert fvu_small < 0.15
    assert l0_large < 0.7 * l0_small


@pytest.mark.parametrize("subtract", [False, True])
@pytest.mark.parametrize("which", ["loss", "mse", "sparsity", "recon"])
def test_fused_step_matches_autograd_reference(subtract, which, monkeypatch):
    """The fused blockwise step (gradients accumulated in the forward pass) against autograd through the STE function,
    with a bandwidth wide enough that many pre-activations fall in the kernel window, over several blocks."""
    monkeypatch.setattr(jumprelu, "JUMPRELU_CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    sae = make_sae(SAEConfig(arch="jumprelu", d_in=6, d_sae=20, jumprelu_bandwidth=0.8,
                             apply_b_dec_to_input=subtract)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    out = sae.training_forward(x, sparsity_coefficient=0.3)
    params = list(sae.parameters())
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    named = dict(zip([n for n, _ in sae.named_parameters()], ref_params))
    ref = jumprelu._reference(x, named["W_enc"], named["b_enc"], named["W_dec"], named["b_dec"],
                              named["log_threshold"], 0.3, 0.8, subtract)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
    pick = {"loss": (out.loss, ref[0]), "mse": (out.mse, ref[2]), "sparsity": (out.sparsity_loss, ref[3]),
            "recon": ((out.recon * upstream).sum(), (ref[1] * upstream).sum())}
    ours, theirs = pick[which]
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    window_hits = ((sae.pre_acts(x) - sae.threshold).abs() < 0.4).sum()
    assert window_hits > 20  # the threshold gradient is exercised
    for (name, p), r in zip(sae.named_parameters(), ref_params):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if r.grad is None else r.grad, msg=name)
    assert out.l0.item() == pytest.approx((sae.encode(x) > 0).sum().item() / 30)
    assert out.fired.tolist() == (sae.encode(x) > 0).any(0).tolist()
