"""Decoder-scale fine-tuning: s = 1 is the SAE itself, and a uniformly shrunk perfect SAE is scaled back to KL ≈ 0."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.evals.configs import EvalConfig
from interplab.evals.sae_eval import TUNED_VARIANTS, evaluate, format_summary
from interplab.evals.scale_tune import decode_scaled, tune_decoder_scale
from interplab.sae import SAEConfig, make_sae

HOOK = "blocks.1.hook_resid_post"
D = 32  # width of the tiny GPT-2
SHRINK = 0.5


def shrunk_sae(model_spec: str = "tiny"):
    """W_enc = [I, −I], W_dec = c·[I; −I]: x̂ = c·x exactly, so every scale 1/c gives x̂ = x and KL 0."""
    sae = make_sae(SAEConfig(arch="relu", d_in=D, d_sae=2 * D, hook_name=HOOK, model=model_spec))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(SHRINK * torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def contexts(n: int, length: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return list(torch.randint(1, 200, (n, length), generator=g))


def test_decode_scaled_by_hand():
    sae = shrunk_sae()
    with torch.no_grad():
        sae.b_dec.copy_(torch.arange(D, dtype=torch.float32))
    f = torch.rand(3, 5, 2 * D)
    ones = torch.ones(2 * D)
    assert torch.allclose(decode_scaled(sae, f, ones, "latent"), sae.decode(f))
    assert torch.allclose(decode_scaled(sae, f, torch.ones(D), "output"), sae.decode(f), atol=1e-6)
    s_out = torch.linspace(0.5, 2.0, D)
    expected = sae.b_dec + s_out * (f @ sae.W_dec)
    assert torch.allclose(decode_scaled(sae, f, s_out, "output"), expected, atol=1e-5)
    s_lat = torch.linspace(0.1, 3.0, 2 * D)
    assert torch.allclose(decode_scaled(sae, f, s_lat, "latent"), (f * s_lat) @ sae.W_dec + sae.b_dec, atol=1e-5)
    with pytest.raises(InterplabError, match="valid: latent, output"):
        decode_scaled(sae, f, ones, "neuron")


@pytest.mark.parametrize("per, width", [("latent", 2 * D), ("output", D)])
def test_shrunk_sae_is_scaled_back(model, per, width):
    sae = shrunk_sae()
    result = tune_decoder_scale(model, sae, HOOK, contexts(12), per=per, epochs=25, lr=0.05, batch_size=4,
                                progress=False)
    assert result.scale.shape == (width,)
    assert result.kl_before > 1e-5  # the tiny random model is close to uniform, so KLs are small
    assert result.kl_after < 0.05 * result.kl_before
    assert result.scale.mean().item() == pytest.approx(1 / SHRINK, rel=0.1)
    assert result.n_tokens == 12 * 15
    assert len(result.history) == 25 and result.history[-1] < result.history[0]
    # only the scales were trained: no gradient ever reached the model or the SAE
    assert all(p.grad is None for p in sae.parameters())
    assert all(p.grad is None for p in model.model.parameters())


def test_bad_arguments(model):
    with pytest.raises(InterplabError, match="valid: latent, output"):
        tune_decoder_scale(model, shrunk_sae(), HOOK, contexts(2), per="neuron", progress=False)
    with pytest.raises(InterplabError, match="no contexts"):
        tune_decoder_scale(model, shrunk_sae(), HOOK, [], progress=False)


def test_evaluate_reports_gap_closed(model, corpus, tmp_path):
    sae_dir = tmp_path / "sae"
    shrunk_sae(str(model.info.spec)).save(str(sae_dir))
    cfg = EvalConfig(sae=str(sae_dir), corpus=corpus, split="test", test_fraction=0.5, tokens=160, ctx_len=16,
                     batch_size=4, device="cpu", scale_tune="latent", scale_tune_tokens=160, scale_tune_epochs=25,
                     scale_tune_lr=0.05)
    result = evaluate(cfg, model=model, progress=False)
    m = result["metrics"]
    assert set(TUNED_VARIANTS) <= set(m["kl"])
    t = m["scale_tuning"]
    assert t["held_out"] is True
    assert t["kl_div_with_sae_scale_tuned"] < 0.1 * t["kl_div_with_sae"]   # held-out tokens, not the tuning ones
    assert t["fvu_tuned"] < 0.05 < m["reconstruction"]["fvu"]
    expected = (t["kl_div_with_sae"] - t["kl_div_with_sae_scale_tuned"]) / (t["kl_div_with_sae"]
                                                                           - t["kl_div_epsilon_random"])
    assert t["gap_closed"] == pytest.approx(expected)
    assert "decoder scales per latent" in format_summary(result)


def test_evaluate_rejects_bad_scale_tune(model, tmp_path):
    sae_dir = tmp_path / "sae"
    shrunk_sae(str(model.info.spec)).save(str(sae_dir))
    with pytest.raises(InterplabError, match="--scale-tune 'yes' is not valid"):
        evaluate(EvalConfig(sae=str(sae_dir), scale_tune="yes", tokens=160, ctx_len=16, device="cpu"), model=model,
                 progress=False)
