"""run_prefix / run_suffix: one clean prefix, many spliced variants, each equal to a full hooked forward pass."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import ToyConfig, ToyTransformer, load_model

SITES = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.2.hook_resid_mid", "blocks.1.mlp.hook_post",
         "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.0.attn.hook_pattern",
         "ln_final.hook_normalized", "ln_final.hook_out", "hook_embed"]


@pytest.fixture(scope="module")
def hf_model(tiny_hf_dir):
    return load_model(str(tiny_hf_dir), device="cpu")


@pytest.fixture(scope="module", params=["hf", "toy"])
def model(request, tiny_hf_dir):
    if request.param == "toy":
        return ToyTransformer(ToyConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=50))
    return load_model(str(tiny_hf_dir), device="cpu")


def _tokens(model):
    return torch.randint(0, model.info.d_vocab, (3, 10), generator=torch.Generator().manual_seed(0))


def _prefix_or_refusal(model, tokens, site):
    """The prefix at `site`; None after checking the refusal where the model has no such site (parallel NeoX)."""
    if site in model.hook_names:
        return model.run_prefix(tokens, site)
    with pytest.raises(InterplabError, match="unknown hook name"):
        model.run_prefix(tokens, site)
    return None


@pytest.mark.parametrize("site", SITES)
def test_suffix_of_the_clean_activation_is_the_full_forward(model, site):
    tokens = _tokens(model)
    if (prefix := _prefix_or_refusal(model, tokens, site)) is None:
        return
    with torch.no_grad():
        torch.testing.assert_close(model.run_suffix(prefix, prefix.act), model.forward(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", SITES)
def test_suffix_of_a_variant_equals_a_full_hooked_pass(model, site):
    tokens = _tokens(model)
    if (prefix := _prefix_or_refusal(model, tokens, site)) is None:
        return
    variant = prefix.act * 0.5 + torch.randn(prefix.act.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    with torch.no_grad():
        spliced = model.run_suffix(prefix, variant)
        reference = model.run_with_hooks(tokens, [(site, lambda act, name: variant)])
    torch.testing.assert_close(spliced, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spliced, model.forward(tokens))



@pytest.mark.parametrize("site", SITES)
def test_last_only_suffix_is_the_last_position_of_the_full_one(model, site):
    tokens = _tokens(model)
    if (prefix := _prefix_or_refusal(model, tokens, site)) is None:
        return
    variant = prefix.act * 0.5
    with torch.no_grad():
        full, last = model.run_suffix(prefix, variant), model.run_suffix(prefix, variant, last_only=True)
    assert last.shape == (tokens.shape[0], 1, model.info.d_vocab)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)

def test_prefix_stops_early_and_suffix_skips_earlier_blocks(hf_model):
    tokens = _tokens(hf_model)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(hf_model.blocks)]
    try:
        prefix = hf_model.run_prefix(tokens, "blocks.1.hook_resid_post")
        assert calls == [0, 1]
        calls.clear()
        with torch.no_grad():
            hf_model.run_suffix(prefix, prefix.act)
        assert calls == [2]
    finally:
        for h in handles:
            h.remove()


def test_suffix_carries_gradients_to_the_replacement(hf_model):
    tokens = _tokens(hf_model)
    prefix = hf_model.run_prefix(tokens, "blocks.1.hook_resid_post")
    replacement = prefix.act.clone().requires_grad_(True)
    hf_model.run_suffix(prefix, replacement).sum().backward()
    assert replacement.grad is not None and replacement.grad.abs().sum() > 0


def test_wrong_replacement_shape(hf_model):
    prefix = hf_model.run_prefix(_tokens(hf_model), "blocks.0.hook_resid_post")
    with pytest.raises(InterplabError, match=r"replacement for 'blocks\.0\.hook_resid_post' must have shape"):
        hf_model.run_suffix(prefix, prefix.act[:, :3])
