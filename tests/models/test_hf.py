"""Hook points on tiny random HF models (GPT-2, Llama with GQA, NeoX parallel and sequential): parity with HF."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import load_model


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(str(tiny_hf_dir), device="cpu")


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.info.d_vocab, (3, 12), generator=torch.Generator().manual_seed(1))


def _no_pattern(names):
    """Without the points that switch attention to interplab's eager function (whose rounding differs from sdpa)."""
    return [n for n in names if "hook_pattern" not in n and "hook_attn_scores" not in n]


def test_no_hooks_logits_and_hidden_states_equal_hf_exactly(model, tokens):
    ref = model.model(tokens, output_hidden_states=True)
    res = model.run_with_cache(tokens, _no_pattern(model.hook_names), return_logits=True)
    assert torch.equal(res.logits, ref.logits)
    assert torch.equal(model.forward(tokens), ref.logits)
    last = model.info.n_layers - 1
    for layer in range(last):  # HF's last hidden state is after the final norm
        assert torch.equal(res.cache[f"blocks.{layer}.hook_resid_post"], ref.hidden_states[layer + 1])
        assert torch.equal(res.cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer])
    assert torch.equal(res.cache["ln_final.hook_out"], ref.hidden_states[-1])
    final_norm = model.model.get_submodule(model.arch.final_norm)
    assert torch.equal(final_norm(res.cache[f"blocks.{last}.hook_resid_post"]), ref.hidden_states[-1])


@pytest.fixture(scope="module")
def weighted_norm_model(tiny_hf_dir):
    """The tiny model with a final norm whose weight (and bias) are far from 1 (and 0), so that the normalised
    input and the norm's output differ."""
    model = load_model(str(tiny_hf_dir), device="cpu")
    norm = model.model.get_submodule(model.arch.final_norm)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 3 + 0.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
    return model


def test_ln_final_hook_normalized_is_transformer_lens_s_before_the_weight(weighted_norm_model, tokens):
    """hook_normalized: (x - mean) / std for LayerNorm, x / rms(x) for RMSNorm, computed here by hand; hook_out:
    HF's final norm output (its last hidden state)."""
    model = weighted_norm_model
    last = f"blocks.{model.info.n_layers - 1}.hook_resid_post"
    ref = model.model(tokens, output_hidden_states=True)
    res = model.run_with_cache(tokens, [last, "ln_final.hook_normalized", "ln_final.hook_out"], return_logits=True)
    x, norm = res.cache[last], model.model.get_submodule(model.arch.final_norm)
    if isinstance(norm, torch.nn.LayerNorm):
        centred = x - x.mean(-1, keepdim=True)
        expected = centred / (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        weighted = expected * norm.weight + norm.bias
    else:
        assert model.info.arch == "llama"
        expected = x / (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
        weighted = expected * norm.weight
    torch.testing.assert_close(res.cache["ln_final.hook_normalized"], expected)
    assert torch.equal(res.cache["ln_final.hook_out"], ref.hidden_states[-1])
    torch.testing.assert_close(res.cache["ln_final.hook_out"], weighted)
    assert not torch.allclose(res.cache["ln_final.hook_normalized"], res.cache["ln_final.hook_out"], atol=0.1)
    assert torch.equal(res.logits, ref.logits)  # reading hook_normalized leaves the forward pass exactly HF's


def test_an_edit_at_hook_normalized_is_weighted_like_the_norm(weighted_norm_model, tokens):
    model = weighted_norm_model
    norm = model.model.get_submodule(model.arch.final_norm)
    with torch.no_grad():
        clean = model.run_with_cache(tokens, ["ln_final.hook_normalized"]).cache["ln_final.hook_normalized"]
        edited = clean * 0.5 + 0.25
        logits = model.run_with_hooks(tokens, [("ln_final.hook_normalized", lambda act, name: edited)])
        weighted = edited * norm.weight + (norm.bias if getattr(norm, "bias", None) is not None else 0)
        torch.testing.assert_close(logits, model.model.get_output_embeddings()(weighted))
        seen = model.run_with_cache(tokens, ["ln_final.hook_out"],
                                    hooks=[("ln_final.hook_normalized", lambda act, name: edited)]).cache
        torch.testing.assert_close(seen["ln_final.hook_out"], weighted)  # hook_out sees the edit, weighted


def test_embed_is_the_embedding_rows(model, tokens):
    cache = model.run_with_cache(tokens, ["hook_embed"]).cache
    W_E = model.model.get_input_embeddings().weight
    assert torch.equal(cache["hook_embed"], W_E[tokens])


def test_resid_decomposes_into_attn_and_mlp_outputs(model, tokens):
    cache = model.run_with_cache(tokens, _no_pattern(model.hook_names)).cache
    for layer in range(model.info.n_layers):
        pre, post = cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_post"]
        attn, mlp = cache[f"blocks.{layer}.hook_attn_out"], cache[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(post, pre + attn + mlp)
        if not model.parallel_residual:
            torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_mid"], pre + attn)
    assert model.parallel_residual == ("blocks.0.hook_resid_mid" not in model.hook_names)


def test_pattern_matches_hf_eager_attentions(model, tokens):
    res = model.run_with_cache(tokens, [f"blocks.{i}.attn.hook_pattern" for i in range(model.info.n_layers)],
                               return_logits=True)
    assert model.model.config._attn_implementation == model._default_attn_impl  # restored after the call
    model.model.config._attn_implementation = "eager"
    try:
        ref = model.model(tokens, output_attentions=True)
    finally:
        model.model.config._attn_implementation = model._default_attn_impl
    for layer in range(model.info.n_layers):
        pattern = res.cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == (3, model.info.n_heads, 12, 12)
        torch.testing.assert_close(pattern, ref.attentions[layer])
        assert torch.all(pattern.triu(diagonal=1) == 0)  # causal
    torch.testing.assert_close(res.logits, ref.logits)


def test_patching_the_whole_stream_reproduces_the_source_run(model, tokens):
    """Replace resid_pre of block 1 with another input's: everything downstream must be that input's."""
    other = torch.flip(tokens, dims=[1])
    source = model.run_with_cache(other, ["blocks.1.hook_resid_pre"]).cache["blocks.1.hook_resid_pre"]
    patched = model.run_with_hooks(tokens, [("blocks.1.hook_resid_pre", lambda act, name: source)])
    torch.testing.assert_close(patched, model.forward(other))


def test_resid_mid_edit_equals_the_same_attn_out_edit(model, tokens):
    direction = torch.randn(model.info.d_model, generator=torch.Generator().manual_seed(2))
    if model.parallel_residual:  # attention and MLP read the same stream: there is no resid_mid to edit
        with pytest.raises(InterplabError, match="unknown hook name"):
            model.run_with_hooks(tokens, [("blocks.1.hook_resid_mid", lambda a, n: a + direction)])
        return
    via_mid = model.run_with_hooks(tokens, [("blocks.1.hook_resid_mid", lambda a, n: a + direction)])
    via_attn = model.run_with_hooks(tokens, [("blocks.1.hook_attn_out", lambda a, n: a + direction)])
    torch.testing.assert_close(via_mid, via_attn)
    assert not torch.allclose(via_mid, model.forward(tokens))
    cache = model.run_with_cache(tokens, ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_pre",
                                          "blocks.1.hook_attn_out"],
                                 hooks=[("blocks.1.hook_resid_mid", lambda a, n: a + direction)]).cache
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"],
                               cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"] + direction)


def test_zero_ablating_neurons_leaves_only_the_output_bias(model, tokens):
    cache = model.run_with_cache(tokens, ["blocks.0.hook_mlp_out"],
                                 hooks=[("blocks.0.mlp.hook_post", lambda a, n: torch.zeros_like(a))]).cache
    out_proj = model.blocks[0].get_submodule(model.arch.mlp_out_proj)
    bias = out_proj.bias if out_proj.bias is not None else torch.zeros(model.info.d_model)
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], bias.expand_as(cache["blocks.0.hook_mlp_out"]))


def test_pattern_edit_attending_to_bos_copies_its_value(model, tokens):
    """If every query attends only to position 0, attn_out is the same vector at every position."""

    def attend_to_first(pattern, name):
        new = torch.zeros_like(pattern)
        new[..., 0] = 1.0
        return new

    cache = model.run_with_cache(tokens, ["blocks.0.hook_attn_out"],
                                 hooks=[("blocks.0.attn.hook_pattern", attend_to_first)]).cache
    attn_out = cache["blocks.0.hook_attn_out"]
    torch.testing.assert_close(attn_out, attn_out[:, :1].expand_as(attn_out))


def test_early_stop_runs_only_the_needed_blocks(model, tokens):
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    handles.append(model.model.get_output_embeddings().register_forward_hook(lambda m, a, o: calls.append("head")))
    try:
        res = model.run_with_cache(tokens, ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"])
        assert res.logits is None and set(res.cache) == {"blocks.0.hook_resid_post", "blocks.1.hook_attn_out"}
        assert calls == [0]  # block 1 stopped inside, block 2 and the unembedding never ran
        calls.clear()
        model.run_with_cache(tokens, ["blocks.0.hook_resid_post"], return_logits=True)
        assert calls == [0, 1, 2, "head"]
    finally:
        for h in handles:
            h.remove()


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())


def test_hooks_are_removed_even_when_the_forward_raises(model, tokens):
    def broken(act, name):
        raise ValueError("boom")

    before = _hook_count(model)
    with pytest.raises(ValueError, match="boom"):
        model.run_with_hooks(tokens, [("blocks.0.hook_resid_mid" if "blocks.0.hook_resid_mid" in model.hook_names
                                       else "blocks.0.hook_attn_out", broken),
                                      ("blocks.1.attn.hook_pattern", lambda a, n: None)])
    assert _hook_count(model) == before
    assert model.model.config._attn_implementation == model._default_attn_impl
    assert torch.equal(model.forward(tokens), model.model(tokens).logits)


def test_unknown_hook_name_lists_valid_names(model, tokens):
    with pytest.raises(InterplabError, match=r"unknown hook name.*blocks\.7\.hook_resid_post.*valid names:.*"
                                             r"blocks\.\{0\.\.2\}\.hook_resid_post"):
        model.run_with_cache(tokens, ["blocks.7.hook_resid_post"])


def test_wrong_replacement_shape_is_a_clear_error(model, tokens):
    with pytest.raises(InterplabError, match=r"'blocks\.0\.hook_resid_post' returned \(3, 12, 5\)"):
        model.run_with_hooks(tokens, [("blocks.0.hook_resid_post", lambda a, n: a[..., :5])])


def test_bad_tokens_are_clear_errors(model):
    with pytest.raises(InterplabError, match="exceed the model's context length 64"):
        model.forward(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(InterplabError, match=r"token ids must lie in \[0, 300\)"):
        model.forward(torch.full((1, 4), 300))
    with pytest.raises(InterplabError, match="int64/int32 tensor"):
        model.forward(torch.zeros(1, 4))
