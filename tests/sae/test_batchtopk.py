"""BatchTopK SAE: batch-level selection by hand, the running threshold θ, inference as a JumpReLU, saving as one."""

from __future__ import annotations

import json

import pytest
import torch
from planted import sparse_data, train_on_planted

from interplab.sae import BatchTopKSAE, JumpReLUSAE, SAEConfig, load_sae, make_sae


def hand_sae(k=1):
    """d_in=2, d_sae=3 with W_enc = [[1, 0, 1], [0, 1, 1]], b_enc = b_dec = 0, W_dec = identity-like rows."""
    sae = make_sae(SAEConfig(arch="batchtopk", d_in=2, d_sae=3, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


X = torch.tensor([[3.0, -1.0], [0.5, 0.2]])  # pre = (3, −1, 2) and (0.5, 0.2, 0.7)


def test_batch_level_selection_by_hand():
    sae = hand_sae(k=1)  # keep k·batch = 2 entries of the whole batch: 3 and 2, both from token 1
    assert sae.encode(X).tolist() == [[3.0, 0.0, 2.0], [0.0, 0.0, 0.0]]
    out = sae.training_forward(X)
    torch.testing.assert_close(out.recon, torch.tensor([[3.0 + 1.2, 1.6], [0.0, 0.0]]))
    assert out.l0.item() == 1.0  # 2 active over 2 tokens: k on average, not per token
    assert out.fired.tolist() == [True, False, True]
    assert out.mse.item() == pytest.approx(((1.2**2 + 2.6**2) + (0.25 + 0.04)) / 2)


def test_threshold_is_the_running_minimum_kept_activation():
    sae = hand_sae(k=1)
    assert sae.threshold.item() == 0.0
    sae.training_forward(X)
    assert sae.threshold.item() == pytest.approx(2.0)  # first batch: its minimum kept value
    sae.training_forward(X * 2)  # minimum kept value 4: θ is the mean over the first batches
    assert sae.threshold.item() == pytest.approx(3.0)
    assert int(sae.threshold_updates) == 2
    with torch.no_grad():  # validation passes do not move θ
        sae.training_forward(X * 10)
    assert sae.threshold.item() == pytest.approx(3.0)
    for _ in range(200):  # later an exponential moving average with rate 0.01
        sae.training_forward(X)
    assert 2.0 < sae.threshold.item() < 2.5


def test_eval_encode_is_a_jumprelu_with_threshold_theta():
    sae = hand_sae(k=1)
    with torch.no_grad():
        sae.threshold.fill_(0.6)
    sae.eval()
    # f = pre · 1[pre > θ]: per token now, no batch competition
    torch.testing.assert_close(sae.encode(X), torch.tensor([[3.0, 0.0, 2.0], [0.0, 0.0, 0.7]]))
    torch.testing.assert_close(sae(X), torch.tensor([[4.2, 1.6], [0.42, 0.56]]))


def test_saved_as_jumprelu_and_loaded_back_exactly(tmp_path):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="batchtopk", d_in=8, d_sae=32, k=3))
    sae.initialize(torch.randn(100, 8))
    for _ in range(3):
        sae.training_forward(torch.randn(64, 8))
    sae.eval()
    sae.save(str(tmp_path / "sae"))
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is True
    back = load_sae(str(tmp_path / "sae"))
    assert type(back) is BatchTopKSAE and not back.training
    assert back.threshold.item() == sae.threshold.item() and int(back.threshold_updates) == 3
    x = torch.randn(50, 8)
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))

    # without our "interplab" entry (as SAELens would read it) it is a JumpReLU with the same outputs
    del cfg["interplab"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    as_jumprelu = load_sae(str(tmp_path / "sae"))
    assert type(as_jumprelu) is JumpReLUSAE
    torch.testing.assert_close(as_jumprelu.threshold, sae.threshold.expand(32))
    assert torch.equal(as_jumprelu.encode(x), sae.encode(x))
    torch.testing.assert_close(as_jumprelu(x), sae(x))


def test_learns_synthetic_sparse_data():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def data(n):
        return sparse_data(n, gen)

    sae = make_sae(SAEConfig(arch="batchtopk", d_in=32, d_sae=128, k=3, aux_k=16))
    sae.initialize(data(1024))
    train_on_planted(sae, gen, 300)
    sae.eval()
    test = data(2048)
    with torch.no_grad():  # inference with the learned θ, not batch competition
        fvu = ((sae(test) - test) ** 2).sum() / ((test - test.mean(0)) ** 2).sum()
        l0 = (sae.encode(test) > 0).float().sum(-1).mean()
    assert fvu < 0.15
    assert 2.0 < l0 < 4.5
