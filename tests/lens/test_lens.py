"""The logit lens: exact at the last layer on every tiny architecture, KL checked by hand and against evals.metrics,
the mean-distribution control, and a tuned lens that must recover a known rotation."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.evals.metrics import kl_per_token
from interplab.models import load_model
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.lens.evaluate import FinalDist, evaluate_lenses, kl_to_final, layer_residuals, prediction_grid, readout
from interplab.lens.tuned import TrainSettings, TunedLens, train_from_batches


def toy_model(seed: int = 0) -> ToyTransformer:
    return ToyTransformer(ToyConfig(n_layers=3, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=24, n_ctx=16,
                                    init_std=0.3, seed=seed)).eval()


def random_tokens(n: int, pos: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def test_last_layer_logit_lens_is_the_model_on_every_tiny_arch(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir), device="cpu")
    tokens = random_tokens(2, 9, model.info.d_vocab, 0)
    resid, logits = layer_residuals(model, tokens)
    assert resid.shape == (model.info.n_layers, 2, 9, model.info.d_model)
    with torch.no_grad():
        lens_last = readout(model, resid[-1])
        plain = model.forward(tokens)
    assert torch.equal(lens_last, logits)
    assert torch.equal(lens_last.log_softmax(-1), plain.log_softmax(-1))
    scores = evaluate_lenses(model, [tokens])
    assert abs(scores.logit["kl"][-1]) < 1e-6
    assert scores.logit["top1_agreement"][-1] == 1.0
    assert scores.n_tokens == 2 * 8  # position 0 is not scored


def test_last_layer_logit_lens_is_the_model_on_the_toy():
    model = toy_model()
    tokens = random_tokens(3, 10, 24, 1)
    resid, logits = layer_residuals(model, tokens)
    with torch.no_grad():
        assert torch.equal(readout(model, resid[-1]), model(tokens))
    assert torch.equal(readout(model, resid[-1]), logits)


def test_kl_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25]])
    final = FinalDist.from_logits(p.log())
    kl = kl_to_final(torch.zeros(1, 3), final)  # q uniform
    by_hand = 0.5 * math.log(0.5 / (1 / 3)) + 2 * 0.25 * math.log(0.25 / (1 / 3))
    assert kl.item() == pytest.approx(by_hand, abs=1e-6)
    assert kl_to_final(p.log() + 7.0, final).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant


def test_kl_of_identical_large_logits_is_zero_in_float32():
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(0)) * 30  # SmolLM2-sized logits
    kl = kl_to_final(logits, FinalDist.from_logits(logits))
    assert kl.abs().max() < 1e-5


def test_kl_and_its_gradient_match_the_plain_formula():
    gen = torch.Generator().manual_seed(0)
    final_logits = torch.randn(5, 11, generator=gen, dtype=torch.float64) * 2
    z = (torch.randn(5, 11, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    final = FinalDist.from_logits(final_logits)
    ours = kl_to_final(z, final)
    reference = kl_per_token(final_logits[None], z[None])[0]
    torch.testing.assert_close(ours, reference)
    weights = torch.rand(5, generator=gen, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), z)
    (g_ref,) = torch.autograd.grad((reference * weights).sum(), z)
    torch.testing.assert_close(g_ours, g_ref)


def test_mean_distribution_control_matches_its_definition():
    model = toy_model()
    tokens = random_tokens(2, 8, 24, 2)
    scores = evaluate_lenses(model, [tokens[:1], tokens[1:]])
    with torch.no_grad():
        p = model(tokens)[:, 1:].flatten(0, 1).double().softmax(-1)
    p_mean = p.mean(0)
    direct = (p * (p.log() - p_mean.log())).sum(-1).mean().item()
    assert scores.baseline["mean_distribution_kl"] == pytest.approx(direct, rel=1e-5)
    entropy = -(p * p.log()).sum(-1).mean().item()
    assert scores.baseline["uniform_kl"] == pytest.approx(math.log(24) - entropy, rel=1e-5)


def test_untrained_tuned_lens_is_the_logit_lens():
    model = toy_model()
    tokens = random_tokens(2, 8, 24, 3)
    lens = TunedLens.for_model(model)
    scores = evaluate_lenses(model, [tokens], lens)
    assert scores.tuned == scores.logit


def test_prediction_grid_top_is_the_models_top_at_the_last_layer():
    model = toy_model()
    tokens = random_tokens(1, 6, 24, 4)[0]
    grid = prediction_grid(model, tokens.tolist(), k=3)
    with torch.no_grad():
        probs = model(tokens[None])[0].softmax(-1)
    assert len(grid) == 3 and len(grid[0]) == 6 and len(grid[0][0]) == 3
    for pos, cells in enumerate(grid[-1]):
        assert cells[0]["id"] == int(probs[pos].argmax())
        assert cells[0]["prob"] == pytest.approx(float(probs[pos].max()), rel=1e-5)
        assert cells[0]["token"] == f"<{cells[0]['id']}>"


def rotating_toy() -> tuple[ToyTransformer, torch.Tensor]:
    """A toy whose last block maps its input x to x R exactly (R a known rotation): no LayerNorm, attention
    switched off, and a ReLU MLP computing relu(xM) − relu(−xM) = xM with M = R − I. The residual after layer 1
    therefore reaches the unembedding rotated by R, and the best tuned-lens translator for layer 1 is A = R − I."""
    d = 8
    model = ToyTransformer(ToyConfig(n_layers=3, d_model=d, n_heads=1, d_head=4, d_mlp=2 * d, d_vocab=32, n_ctx=16,
                                     act_fn="relu", layer_norm=False, init_std=0.3, seed=0)).eval()
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
    m, eye = rotation - torch.eye(d), torch.eye(d)
    last = model.blocks[2]
    with torch.no_grad():
        last.attn.W_O.zero_()
        last.attn.b_O.zero_()
        last.mlp.W_in.copy_(torch.cat([m, -m], dim=1))
        last.mlp.W_out.copy_(torch.cat([eye, -eye], dim=0))
        last.mlp.b_in.zero_()
        last.mlp.b_out.zero_()
    return model, rotation


def test_tuned_lens_recovers_a_known_rotation():
    model, rotation = rotating_toy()
    tokens = random_tokens(1, 2, 32, 9)
    resid, _ = layer_residuals(model, tokens)
    torch.testing.assert_close(resid[2], resid[1] @ rotation, atol=1e-5, rtol=1e-5)  # the construction works
    train = [random_tokens(16, 16, 32, seed) for seed in range(8)]
    settings = TrainSettings(epochs=6, batch_tokens=64, lr=0.1, dtype="float32")
    lens, losses = train_from_batches(model, train, settings, progress=False)
    assert lens.trained_layers == [0, 1]
    assert losses[-1] < losses[0] / 20
    held_out = random_tokens(16, 16, 32, 100)
    scores = evaluate_lenses(model, [held_out], lens)
    assert scores.logit["kl"][1] > 0.2  # the rotation really hides the answer from the logit lens
    assert scores.tuned["kl"][1] < scores.logit["kl"][1] / 100
    assert scores.tuned["kl"][0] < scores.logit["kl"][0] / 5
    # On held-out residuals the translator is the rotation (what the data identify; A itself converges more
    # slowly along the residual's low-variance directions).
    h = layer_residuals(model, held_out)[0][1, :, 1:].flatten(0, 1)
    with torch.no_grad():
        err = (lens.translate(h, 1) - h @ rotation).norm() / (h @ rotation).norm()
    assert err < 0.1
