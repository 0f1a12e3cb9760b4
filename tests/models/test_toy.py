"""The in-house toy transformer: equations, hooks, seeding, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import ToyConfig, ToyTransformer, load_model

CFG = ToyConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=10, d_vocab=7, seed=3)


@pytest.fixture
def tokens():
    return torch.randint(0, 7, (4, 10), generator=torch.Generator().manual_seed(0))


def test_seeded_initialisation_is_reproducible_and_seed_dependent():
    a, b = ToyTransformer(CFG), ToyTransformer(CFG)
    c = ToyTransformer(ToyConfig(**{**CFG.__dict__, "seed": 4}))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.W_E, c.W_E)
    assert abs(a.blocks[0].attn.W_Q.std().item() - CFG.init_std) < 0.005


def test_forward_matches_equations_written_out_by_hand(tokens):
    """One attention-only layer without LayerNorm, computed independently with explicit loops over heads."""
    cfg = ToyConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=None, n_ctx=10, d_vocab=7, layer_norm=False)
    model = ToyTransformer(cfg)
    attn = model.blocks[0].attn
    x = model.W_E[tokens] + model.W_pos[: tokens.shape[1]]
    out = torch.zeros_like(x)
    for h in range(cfg.n_heads):
        q, k, v = x @ attn.W_Q[h], x @ attn.W_K[h], x @ attn.W_V[h]
        scores = q @ k.transpose(1, 2) / math.sqrt(cfg.d_head)
        scores = scores + torch.triu(torch.full((10, 10), float("-inf")), diagonal=1)
        out = out + torch.softmax(scores, -1) @ v @ attn.W_O[h]
    expected = (x + out) @ model.W_U
    torch.testing.assert_close(model.forward(tokens), expected)


def test_hook_names_and_cache_shapes(tokens):
    model = ToyTransformer(CFG)
    assert model.hook_names[:2] == ["hook_embed", "hook_pos_embed"]
    assert model.hook_names[-2:] == ["ln_final.hook_normalized", "ln_final.hook_out"]
    cache = model.run_with_cache(tokens).cache
    assert set(cache) == set(model.hook_names)
    assert cache["blocks.1.attn.hook_pattern"].shape == (4, 2, 10, 10)
    assert cache["blocks.0.mlp.hook_post"].shape == (4, 10, 32)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"],
                               cache["blocks.0.hook_resid_mid"] + cache["blocks.0.hook_mlp_out"])
    torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"].sum(-1), torch.ones(4, 2, 10))


def test_attention_only_model_has_no_mlp_hooks():
    model = ToyTransformer(ToyConfig(d_mlp=None))
    assert not [n for n in model.hook_names if "mlp" in n or "resid_mid" in n]
    with pytest.raises(InterplabError, match="unknown hook name"):
        model.run_with_cache(torch.zeros(1, 3, dtype=torch.long), ["blocks.0.hook_mlp_out"])


def test_causal_later_tokens_do_not_change_earlier_logits(tokens):
    model = ToyTransformer(CFG)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 7
    torch.testing.assert_close(model.forward(tokens)[:, :6], model.forward(changed)[:, :6])
    assert not torch.allclose(model.forward(tokens)[:, 6:], model.forward(changed)[:, 6:])


def test_run_with_hooks_patches_and_early_stop(tokens):
    model = ToyTransformer(CFG)
    other = torch.flip(tokens, [1])
    source = model.run_with_cache(other, ["blocks.1.hook_resid_pre"]).cache["blocks.1.hook_resid_pre"]
    patched = model.run_with_hooks(tokens, [("blocks.1.hook_resid_pre", lambda a, n: source)])
    torch.testing.assert_close(patched, model.forward(other))
    ran = []
    handle = model.blocks[1].register_forward_hook(lambda *a: ran.append(1))
    model.run_with_cache(tokens, ["blocks.0.hook_resid_post"])
    handle.remove()
    assert ran == []


def test_save_load_round_trip(tmp_path, tokens):
    model = ToyTransformer(CFG)
    model.save(tmp_path / "toy")
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(str(tmp_path / "toy"), device="cpu")
    assert isinstance(loaded, ToyTransformer) and loaded.cfg == CFG
    torch.testing.assert_close(loaded.forward(tokens), model.forward(tokens), rtol=0, atol=0)


def test_bad_config_is_a_clear_error():
    with pytest.raises(InterplabError, match="act_fn 'tanh' is not one of"):
        ToyConfig(act_fn="tanh")
    with pytest.raises(InterplabError, match="n_layers must be >= 1"):
        ToyConfig(n_layers=0)


def test_ln_final_hooks_are_the_normalised_input_and_the_norm_output(tokens):
    """TransformerLens's hook_normalized is (x - mean) / std, before the weight; hook_out is the LayerNorm's output."""
    model = ToyTransformer(CFG)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.ln_final.weight.copy_(torch.rand(CFG.d_model, generator=g) + 0.5)
        model.ln_final.bias.copy_(torch.randn(CFG.d_model, generator=g))
    last = f"blocks.{CFG.n_layers - 1}.hook_resid_post"
    res = model.run_with_cache(tokens, [last, "ln_final.hook_normalized", "ln_final.hook_out"], return_logits=True)
    x = res.cache[last]
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(res.cache["ln_final.hook_normalized"],
                               centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
    torch.testing.assert_close(res.cache["ln_final.hook_out"], model.ln_final(x))
    torch.testing.assert_close(res.logits, model.ln_final(x) @ model.W_U + model.b_U)
