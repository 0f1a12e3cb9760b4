"""The graph's prediction for zeroing a feature equals the real change where the model is linear around the prompt:
no norms, constant attention patterns (W_Q = W_K = 0), ReLU MLPs copied exactly, and no neuron switching on or off."""

from __future__ import annotations

import torch

from graph_toys import exact_set, prompt, toy
from interplab.graphs.attribution import attribute
from interplab.graphs.interventions import Clamp, clamp_hooks, logit_effects
from interplab.graphs.predict import predicted_logit_change


def _firing(model, tokens, clamps=(), transcoders=None):
    names = [f"blocks.{l}.mlp.hook_post" for l in range(3)]
    if clamps:
        reads = {}
        hooks = [(n, lambda a, n: reads.__setitem__(n, a > 0)) for n in names]
        with torch.no_grad():
            model.run_with_hooks(tokens, clamp_hooks(transcoders, clamps) + hooks)
        return torch.stack([reads[n] for n in names])
    cache = model.run_with_cache(tokens, names).cache
    return torch.stack([cache[n] > 0 for n in names])


def test_prediction_equals_the_real_change_where_the_model_is_linear():
    model = toy(layer_norm=False, seed=4)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.zero_(), block.attn.W_K.zero_()
    transcoders = exact_set(model)
    tokens = prompt()
    graph = attribute(model, transcoders, tokens, max_logits=1)
    rep, top = graph.rep, int(graph.logit_ids[0])
    clean_firing = _firing(model, tokens)
    checked = 0
    for i in range(graph.n_features):
        clamp = Clamp(int(rep.feat_layer[i]), int(rep.feat_pos[i]), int(rep.feat_index[i]), 0.0)
        firing = _firing(model, tokens, [clamp], transcoders)
        firing[clamp.layer, 0, clamp.pos, clamp.feature] = True  # the zeroed neuron itself
        if not torch.equal(firing, clean_firing):
            continue  # some neuron switched: the model is not linear along this change
        real = logit_effects(model, transcoders, tokens, [clamp], [top]).delta_vs_mean[0]
        assert abs(predicted_logit_change(graph, i, 0) - real) < 1e-9
        checked += abs(real) > 1e-3
    assert checked >= 5
