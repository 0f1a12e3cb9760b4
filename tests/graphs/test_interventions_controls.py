"""Clamping a feature of an exact transcoder is editing the MLP neuron it copies; the control dictionary keeps each
latent's norms and biases and nothing of its directions."""

from __future__ import annotations

import pytest
import torch

from graph_toys import exact_set, noisy_set, prompt, toy
from interplab.errors import InterplabError
from interplab.graphs.controls import control_transcoders
from interplab.graphs.interventions import Clamp, intervene, logit_effects
from interplab.graphs.replacement import check_transcoders


def _neuron_edit(layer, pos, neuron, value):
    def fn(act, _name):
        act = act.clone()
        act[:, pos, neuron] = value
        return act
    return (f"blocks.{layer}.mlp.hook_post", fn)


def test_clamping_an_exact_feature_equals_setting_its_neuron():
    model = toy()
    transcoders = exact_set(model)
    tokens = prompt()
    post = model.run_with_cache(tokens, ["blocks.0.mlp.hook_post"]).cache["blocks.0.mlp.hook_post"][0]
    pos, neuron = (int(x) for x in (post == post.max()).nonzero()[0])  # a firing neuron
    clamps = [Clamp(0, pos, neuron, 0.0), Clamp(1, 3, 2, 1.5)]
    with torch.no_grad():
        want = model.run_with_hooks(tokens, [_neuron_edit(0, pos, neuron, 0.0), _neuron_edit(1, 3, 2, 1.5)])
    got = intervene(model, transcoders, tokens, clamps)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert (got - model.forward(tokens)).abs().max() > 1e-3
    effects = logit_effects(model, transcoders, tokens, clamps[:1], [0, 5])
    with torch.no_grad():
        want_one = model.run_with_hooks(tokens, [_neuron_edit(0, pos, neuron, 0.0)])[0, -1, [0, 5]]
        clean = model.forward(tokens)[0, -1, [0, 5]]
    torch.testing.assert_close(torch.tensor(effects.delta, dtype=torch.float64), want_one - clean, atol=1e-12, rtol=0)


def test_frozen_attention_intervention_keeps_the_clean_patterns():
    model = toy()
    transcoders = exact_set(model)
    tokens = prompt()
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    clean = model.run_with_cache(tokens, names).cache
    hooks = [(n, lambda a, n: clean[n]) for n in names] + [_neuron_edit(0, 2, 4, 2.0)]
    with torch.no_grad():
        want = model.run_with_hooks(tokens, hooks)
    got = intervene(model, transcoders, tokens, [Clamp(0, 2, 4, 2.0)], freeze_attention=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert (got - intervene(model, transcoders, tokens, [Clamp(0, 2, 4, 2.0)])).abs().max() > 1e-6


def test_bad_clamps_and_transcoder_sets_are_refused():
    model = toy()
    transcoders = exact_set(model)
    with pytest.raises(InterplabError, match="position 9"):
        intervene(model, transcoders, prompt(), [Clamp(0, 9, 0)])
    with pytest.raises(InterplabError, match="one transcoder per layer"):
        check_transcoders(model, {0: transcoders[0], 1: transcoders[1]})
    with pytest.raises(InterplabError, match="MLP's input and output"):
        check_transcoders(model, {**transcoders, 2: transcoders[1]})


def test_control_keeps_norms_and_biases_and_randomises_directions():
    model = toy()
    real = noisy_set(model)
    control = control_transcoders(real, seed=0)
    for layer, tc in real.items():
        c = control[layer]
        torch.testing.assert_close(c.sae.W_enc.norm(dim=0), tc.sae.W_enc.norm(dim=0))
        torch.testing.assert_close(c.sae.W_dec.norm(dim=1), tc.sae.W_dec.norm(dim=1))
        assert torch.equal(c.sae.b_enc, tc.sae.b_enc) and torch.equal(c.sae.b_dec, tc.sae.b_dec)
        cos = torch.nn.functional.cosine_similarity(c.sae.W_dec, tc.sae.W_dec, dim=1)
        assert cos.abs().max() < 0.95  # random directions in 12 dimensions: none is the original
    again = control_transcoders(real, seed=0)
    assert torch.equal(again[1].sae.W_dec, control[1].sae.W_dec)
    assert not torch.equal(control_transcoders(real, seed=1)[1].sae.W_dec, control[1].sae.W_dec)
