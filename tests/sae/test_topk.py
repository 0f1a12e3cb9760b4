"""TopK SAE: hand-computed selection, the sparse training step against a dense reference, AuxK, learning."""

from __future__ import annotations

import pytest
import torch
from planted import planted_directions, sparse_data, train_on_planted

import interplab.sae.selection as selection
from interplab.sae import SAEConfig, make_sae


def hand_sae(k=2, **kw):
    """d_in=2, d_sae=3: W_enc, b_enc, W_dec, b_dec chosen for hand computation."""
    sae = make_sae(SAEConfig(arch="topk", d_in=2, d_sae=3, k=k, **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([1.0, 1.0]))
    return sae


def test_encode_by_hand():
    sae = hand_sae(k=2)
    x = torch.tensor([[2.0, 3.0], [1.0, 4.0]])
    # x − b_dec = (1, 2) and (0, 3); pre = (1, 1.5, −1) and (0, 2.5, −3)
    assert sae.encode(x).tolist() == [[1.0, 1.5, 0.0], [0.0, 2.5, 0.0]]  # top 2, then ReLU (a kept 0 stays 0)
    assert hand_sae(k=1).encode(x).tolist() == [[0.0, 1.5, 0.0], [0.0, 2.5, 0.0]]
    # x̂ = f W_dec + b_dec
    torch.testing.assert_close(sae(x), torch.tensor([[2.0, 2.5], [1.0, 3.5]]))


def test_training_forward_by_hand():
    sae = hand_sae(k=1)
    out = sae.training_forward(torch.tensor([[2.0, 3.0], [1.0, 4.0]]))
    torch.testing.assert_close(out.recon, torch.tensor([[1.0, 2.5], [1.0, 3.5]]))
    assert out.mse.item() == pytest.approx(((1 + 0.25) + (0 + 0.25)) / 2)
    assert out.loss.item() == pytest.approx(out.mse.item())
    assert out.sparsity_loss.item() == 0.0 and out.aux_loss.item() == 0.0
    assert out.l0.item() == 1.0 and out.fired.tolist() == [False, True, False]


def test_aux_loss_by_hand():
    sae = hand_sae(k=1, aux_k=1, aux_coefficient=0.5)
    x = torch.tensor([[2.0, 3.0], [1.0, 4.0]])
    out = sae.training_forward(x, dead_mask=torch.tensor([True, False, True]))
    # residuals e = x − x̂ = (1, 0.5) and (0, 0.5); dead latents 0 and 2, pre (1, −1) and (0, −3):
    # token 1 uses latent 0 with 1 → ê = (1, 0); token 2 uses latent 0 with 0 → ê = (0, 0) (no ReLU, no bias)
    expected = 0.5 * ((0 + 0.25) + (0 + 0.25)) / 2
    assert out.aux_loss.item() == pytest.approx(expected)
    assert out.loss.item() == pytest.approx(out.mse.item() + expected)


def test_aux_loss_is_zero_without_dead_latents_and_positive_with():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=8, d_sae=32, k=2, aux_k=4))
    x = torch.randn(64, 8)
    assert sae.training_forward(x).aux_loss.item() == 0.0
    assert sae.training_forward(x, dead_mask=torch.zeros(32, dtype=torch.bool)).aux_loss.item() == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[10:20] = True
    out = sae.training_forward(x, dead_mask=dead)
    assert out.aux_loss.item() > 0
    # the AuxK gradient reaches the dead latents' decoder rows only
    out.aux_loss.backward()
    touched = sae.W_dec.grad.abs().sum(1) > 0
    assert touched[dead].all() and not touched[~dead].any()


def dense_reference(sae, x, dead_mask):
    """Plain autograd TopK SAE loss with AuxK, as written in the module docstring."""
    cfg = sae.cfg
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(cfg.k, dim=-1)
    recon = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ sae.W_dec + sae.b_dec
    mse = ((recon - x) ** 2).sum(-1).mean()
    masked = torch.where(dead_mask, pre, -torch.inf)
    av, ai = masked.topk(min(cfg.aux_k, int(dead_mask.sum())), dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, ai, av) @ sae.W_dec
    aux = cfg.aux_coefficient * ((e_hat - (x - recon).detach()) ** 2).sum(-1).mean()
    return mse + aux, recon


@pytest.mark.parametrize("aux_path", ["dense block", "sparse pairs"])
def test_sparse_training_step_equals_dense_reference(aux_path, monkeypatch):
    monkeypatch.setattr(selection, "DENSE_AUX_RATIO", 100 if aux_path == "dense block" else 0)
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="topk", d_in=12, d_sae=48, k=4, aux_k=6)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x = torch.randn(40, 12, dtype=torch.float64)
    dead = torch.rand(48) < 0.4
    out = sae.training_forward(x, dead_mask=dead)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    loss, recon = dense_reference(sae, x, dead)
    loss.backward()
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.loss, loss)
    for n, p in sae.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=n)


def test_fired_and_l0_count_only_positive_activations():
    sae = hand_sae(k=2)
    out = sae.training_forward(torch.tensor([[1.0, 4.0]]))  # pre = (0, 2.5, −3): the second kept value is 0
    assert out.l0.item() == 1.0
    assert out.fired.tolist() == [False, True, False]


def test_learns_synthetic_sparse_data():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    sae = make_sae(SAEConfig(arch="topk", d_in=32, d_sae=128, k=3, aux_k=16))
    sae.initialize(sparse_data(1024, gen))
    test, dirs = sparse_data(2048, torch.Generator().manual_seed(99)), planted_directions()
    train_on_planted(sae, gen, 400)
    with torch.no_grad():
        fvu = ((sae(test) - test) ** 2).sum() / ((test - test.mean(0)) ** 2).sum()
        best_cos = (dirs @ sae.W_dec.T).max(dim=1).values  # how well each true direction is found
    assert fvu < 0.1
    assert (best_cos > 0.9).float().mean() > 0.8
