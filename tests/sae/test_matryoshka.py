"""Matryoshka SAE: nested prefix reconstructions by hand and against a dense reference, and their summed loss."""

from __future__ import annotations

import pytest
import torch

from interplab.sae import SAEConfig, make_sae


def test_level_of_latent():
    sae = make_sae(SAEConfig(arch="matryoshka", d_in=4, d_sae=10, k=2, matryoshka_prefixes=[2, 5, 10]))
    assert sae.level_of_latent().tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]


def test_nested_reconstructions_by_hand():
    """d_in=2, d_sae=3, prefixes [1, 2, 3], k=2 over a batch of one token: pre = (3, −1, 2) keeps latents 0, 2."""
    sae = make_sae(SAEConfig(arch="matryoshka", d_in=2, d_sae=3, k=2, matryoshka_prefixes=[1, 2, 3]))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
    x = torch.tensor([[3.5, -1.0]])  # x − b_dec = (3, −1)
    out = sae.training_forward(x)
    # level 1 (latent 0): b_dec + 3·(1, 0) = (3.5, 0); level 2 adds nothing (latent 1 inactive);
    # level 3 adds 2·(0.6, 0.8): (4.7, 1.6)
    torch.testing.assert_close(out.recon, torch.tensor([[4.7, 1.6]]))
    level_mse = [(0 + 1.0), (0 + 1.0), (1.2**2 + 2.6**2)]
    assert out.mse.item() == pytest.approx(level_mse[-1])
    assert out.loss.item() == pytest.approx(sum(level_mse))
    assert out.l0.item() == 2.0 and out.fired.tolist() == [True, False, True]


def test_loss_and_gradients_equal_dense_reference():
    torch.manual_seed(0)
    prefixes = [3, 10, 24]
    sae = make_sae(SAEConfig(arch="matryoshka", d_in=6, d_sae=24, k=3, aux_k=4, matryoshka_prefixes=prefixes))
    sae = sae.double()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x = torch.randn(20, 6, dtype=torch.float64)
    dead = torch.rand(24) < 0.3
    out = sae.training_forward(x, dead_mask=dead)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = pre.relu().reshape(-1)
    v, i = flat.topk(3 * 20)
    f = torch.zeros_like(flat).scatter(0, i, v).reshape(pre.shape)
    loss = 0.0
    for m in prefixes:
        recon = f[:, :m] @ sae.W_dec[:m] + sae.b_dec
        loss = loss + ((recon - x) ** 2).sum(-1).mean()
    masked = torch.where(dead, pre, -torch.inf)
    av, ai = masked.topk(4, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, ai, av) @ sae.W_dec
    loss = loss + sae.cfg.aux_coefficient * ((e_hat - (x - recon).detach()) ** 2).sum(-1).mean()
    loss.backward()
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.loss, loss)
    for n, p in sae.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=n)


def test_a_single_prefix_is_plain_batchtopk():
    torch.manual_seed(0)
    mat = make_sae(SAEConfig(arch="matryoshka", d_in=6, d_sae=24, k=3, matryoshka_prefixes=[24]))
    btk = make_sae(SAEConfig(arch="batchtopk", d_in=6, d_sae=24, k=3))
    btk.load_state_dict(mat.state_dict())
    x = torch.randn(16, 6)
    a, b = mat.training_forward(x), btk.training_forward(x)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.recon, b.recon)
    assert torch.equal(mat.threshold, btk.threshold)
