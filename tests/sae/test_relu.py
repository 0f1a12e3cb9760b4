"""ReLU SAE with the decoder-norm-weighted L1 penalty: hand-computed values, the hand-written backward, learning."""

from __future__ import annotations

import pytest
import torch
from planted import sparse_data

import interplab.sae.relu as relu
from interplab.sae import SAEConfig, make_sae
from interplab.sae.relu import _ReLUSAELoss


def hand_sae(**kw):
    """d_in=2, d_sae=3 with weights chosen so that everything can be computed by hand."""
    sae = make_sae(SAEConfig(arch="relu", d_in=2, d_sae=3, **kw))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.1, 0.2]))
    return sae


def test_encode_decode_by_hand():
    sae = hand_sae()
    x = torch.tensor([[1.0, 2.0]])
    # pre = (1, 2 − 0.5, 1 − 2) = (1, 1.5, −1); the encoder reads x itself (no b_dec subtraction by default)
    assert sae.encode(x).tolist() == [[1.0, 1.5, 0.0]]
    # x̂ = 1·(1, 0) + 1.5·(0, 2) + (0.1, 0.2)
    torch.testing.assert_close(sae(x), torch.tensor([[1.1, 3.2]]))


def test_encode_subtracts_b_dec_when_configured():
    sae = hand_sae(apply_b_dec_to_input=True)
    # x − b_dec = (0.9, 1.8): pre = (0.9, 1.3, −0.9)
    torch.testing.assert_close(sae.encode(torch.tensor([[1.0, 2.0]])), torch.tensor([[0.9, 1.3, 0.0]]))


def test_training_forward_by_hand():
    sae = hand_sae()
    out = sae.training_forward(torch.tensor([[1.0, 2.0]]), sparsity_coefficient=0.5)
    torch.testing.assert_close(out.recon, torch.tensor([[1.1, 3.2]]))
    assert out.mse.item() == pytest.approx(0.1**2 + 1.2**2)             # (1.1−1)² + (3.2−2)²
    assert out.sparsity_loss.item() == pytest.approx(0.5 * (1 * 1 + 1.5 * 2 + 0 * 2**0.5))  # λ Σ f_i ‖W_dec[i]‖
    assert out.loss.item() == pytest.approx(1.45 + 2.0)
    assert out.aux_loss.item() == 0.0 and out.l0.item() == 2.0
    assert out.fired.tolist() == [True, True, False]
    default = sae.training_forward(torch.tensor([[1.0, 2.0]]))
    assert default.sparsity_loss.item() == pytest.approx(5.0 * 4.0)       # cfg.l1_coefficient = 5


def reference_loss(x, W_enc, b_enc, W_dec, b_dec, l1, subtract):
    """Plain autograd version of the ReLU SAE loss."""
    f = torch.relu((x - b_dec if subtract else x) @ W_enc + b_enc)
    recon = f @ W_dec + b_dec
    mse = ((recon - x) ** 2).sum(-1).mean()
    sparsity = l1 * (f * W_dec.norm(dim=1)).sum(-1).mean()
    return mse, sparsity, recon


@pytest.mark.parametrize("subtract", [False, True])
@pytest.mark.parametrize("which", ["loss", "mse", "sparsity", "recon"])
def test_hand_written_backward_matches_autograd(subtract, which):
    g = torch.Generator().manual_seed(0)
    d_in, d_sae = 6, 20
    sae = make_sae(SAEConfig(arch="relu", d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=subtract)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(16, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    out = sae.training_forward(x, sparsity_coefficient=0.3)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    x_ref = x.detach().clone().requires_grad_()
    mse, sparsity, recon = reference_loss(x_ref, *ref_params, 0.3, subtract)
    upstream = torch.randn(recon.shape, generator=g, dtype=torch.float64)
    pick = {"loss": (out.loss, mse + sparsity), "mse": (out.mse, mse), "sparsity": (out.sparsity_loss, sparsity),
            "recon": ((out.recon * upstream).sum(), (recon * upstream).sum())}
    ours, ref = pick[which]
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    for p, r in zip(params + [x], ref_params + [x_ref]):
        torch.testing.assert_close(p.grad, torch.zeros_like(p) if r.grad is None else r.grad)


def test_blocks_of_tokens_add_up_to_the_whole_batch(monkeypatch):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="relu", d_in=6, d_sae=20, apply_b_dec_to_input=True)).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x = torch.randn(23, 6, dtype=torch.float64)
    results = []
    for chunk in (512, 5):  # one block, then five blocks of at most 5 tokens
        monkeypatch.setattr(relu, "RELU_CHUNK", chunk)
        sae.zero_grad()
        out = sae.training_forward(x, sparsity_coefficient=0.2)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in sae.parameters()]))
    (a, ga), (b, gb) = results
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


def test_no_grad_forward_matches_and_builds_nothing():
    sae = hand_sae()
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    with torch.no_grad():
        out = sae.training_forward(x, sparsity_coefficient=0.5)
    assert out.loss.grad_fn is None
    torch.testing.assert_close(out.loss, sae.training_forward(x, sparsity_coefficient=0.5).loss)


@pytest.mark.parametrize("subtract", [False, True])
def test_gradcheck(subtract):
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (3, 5), (5,), (5, 3), (3,)]  # x, W_enc, b_enc, W_dec, b_dec
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    for i in range(4):  # loss, recon, mse and the L1 term are all differentiable outputs
        assert torch.autograd.gradcheck(lambda *a: _ReLUSAELoss.apply(*a, 0.7, subtract, True)[i], args)


def test_decoder_norms_are_not_constrained():
    sae = hand_sae()
    before = sae.W_dec.detach().clone()
    out = sae.training_forward(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))
    out.loss.backward()
    grad = sae.W_dec.grad.clone()
    sae.before_optimizer_step()
    sae.after_optimizer_step()
    assert torch.equal(sae.W_dec.grad, grad) and torch.equal(sae.W_dec.detach(), before)


def test_learns_synthetic_sparse_data():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    sae = make_sae(SAEConfig(arch="relu", d_in=32, d_sae=128, l1_coefficient=0.1))
    sae.initialize(sparse_data(1024, gen))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    test = sparse_data(2048, torch.Generator().manual_seed(99))
    for _ in range(400):
        out = sae.training_forward(sparse_data(256, gen))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        fvu = ((sae(test) - test) ** 2).sum() / ((test - test.mean(0)) ** 2).sum()
        l0 = (sae.encode(test) > 0).float().sum(-1).mean()
    assert fvu < 0.1
    assert l0 < 64  # sparse: far fewer than the 128 latents are active
