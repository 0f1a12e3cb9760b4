"""Graphs through a cross-layer transcoder: the per-layer set it contains, the MLPs it copies exactly, and edge weights
against finite differences in a linearised replacement model built here from the CLT's weights alone."""

from __future__ import annotations

import pytest
import torch

from graph_toys import clt_from_set, exact_clt, noisy_clt, noisy_set, prompt, toy
from interplab.errors import InterplabError
from interplab.graphs.attribution import attribute
from interplab.graphs.replacement import check_transcoders, replacement_logits, setup_replacement
from interplab.graphs.scores import graph_scores
from interplab.sae.crosslayer import CrossLayerTranscoder


def _scores(graph, n_layers):
    return graph_scores(graph.adjacency, graph.logit_probs, n_features=graph.n_features,
                        n_errors=n_layers * graph.n_pos, n_tokens=graph.n_pos)


def test_clt_without_cross_layer_decoders_is_the_per_layer_set():
    model = toy()
    per_layer = noisy_set(model)  # TopK k=4, 24 latents per layer
    clt = clt_from_set(per_layer, activation="topk", k=4)
    tokens = prompt()
    a = attribute(model, per_layer, tokens, max_logits=3, logit_prob=1.0, batch_size=7)
    b = attribute(model, clt, tokens, max_logits=3, logit_prob=1.0, batch_size=7)
    for name in ("feat_layer", "feat_pos", "feat_index"):
        assert torch.equal(getattr(a.rep, name), getattr(b.rep, name))
    assert a.n_features == 4 * 3 * tokens.shape[1]  # k per layer and position: the comparison has nodes in it
    assert torch.equal(a.logit_ids, b.logit_ids)
    torch.testing.assert_close(b.rep.errors, a.rep.errors, atol=1e-12, rtol=0)
    torch.testing.assert_close(b.adjacency, a.adjacency, atol=1e-10, rtol=0)
    assert a.adjacency.abs().max() > 0.1
    torch.testing.assert_close(replacement_logits(model, clt, tokens), replacement_logits(model, per_layer, tokens),
                               atol=1e-10, rtol=0)


def test_clt_of_the_mlps_gives_the_original_logits_zero_errors_and_completeness_one():
    model = toy()
    clt = exact_clt(model)
    tokens = prompt()
    with torch.no_grad():
        real = model.forward(tokens)
    torch.testing.assert_close(replacement_logits(model, clt, tokens), real, atol=1e-12, rtol=0)
    rep = setup_replacement(model, clt, tokens)
    assert rep.errors.abs().max() < 1e-12
    post = model.run_with_cache(tokens, [f"blocks.{l}.mlp.hook_post" for l in range(3)]).cache
    assert rep.feat_layer.shape[0] == sum(int((v > 0).sum()) for v in post.values())  # the firing neurons
    # each feature has one decoder row per layer from its own on: 3, 2, 1 (the later ones zero here)
    assert rep.decoder_vecs.shape[0] == int((3 - rep.feat_layer).sum())
    scores = _scores(attribute(model, clt, tokens), 3)
    assert abs(scores.completeness - 1) < 1e-9 and abs(scores.replacement - 1) < 1e-9 and scores.error_share < 1e-9
    noisy = _scores(attribute(model, noisy_clt(model), tokens), 3)
    assert noisy.completeness < 0.9 and noisy.error_share > 0.1


def _linearised(model, clt, tokens, clean, perturb):
    """Patterns and scales at their clean values, MLP output j = clean + perturb(j), embedding + perturb(−1).
    Returns every layer's CLT pre-activations [layer][pos, d_sae] and ln_final's output at the last position."""
    reads: dict[str, torch.Tensor] = {}
    hooks = [(n, lambda a, n: clean[n]) for n in clean if n.endswith(("hook_pattern", "hook_scale"))]
    hooks.append(("hook_embed", lambda a, n: a + perturb(-1)))

    def read(a, n):
        reads[n] = a

    for l in range(clt.n_layers):
        hooks += [(f"blocks.{l}.mlp.hook_in", read),
                  (f"blocks.{l}.hook_mlp_out", lambda a, n, l=l: clean[n] + perturb(l))]
    hooks.append(("ln_final.hook_out", read))
    with torch.no_grad():
        model.run_with_hooks(tokens, hooks)
    pre = [reads[f"blocks.{l}.mlp.hook_in"][0] @ clt.W_enc[l] + clt.b_enc[l] for l in range(clt.n_layers)]
    return pre, reads["ln_final.hook_out"][0, -1]


def test_clt_edges_equal_finite_differences_in_the_linearised_model():
    model = toy()
    clt = noisy_clt(model)
    tokens = prompt()
    L, n_pos, d = 3, tokens.shape[1], model.info.d_model
    graph = attribute(model, clt, tokens, max_logits=3, logit_prob=1.0, batch_size=9)
    rep = graph.rep
    names = [n for n in model.hook_names if n.endswith(("hook_pattern", "hook_scale", "mlp.hook_in", "hook_mlp_out"))]
    clean = model.run_with_cache(tokens, names).cache
    xs = [clean[f"blocks.{l}.mlp.hook_in"] for l in range(L)]
    with torch.no_grad():
        acts = [clt.encode(l, xs[l])[0] for l in range(L)]
        recon = clt(xs)
    W_U = model.W_U.detach()
    u = (W_U - W_U.mean(1, keepdim=True))[:, graph.logit_ids]

    # what each source writes, by layer, from the CLT's weights: a feature of layer i into every j ≥ i
    sources: list[dict[int, tuple[int, torch.Tensor]]] = []
    for i, p, f in zip(rep.feat_layer.tolist(), rep.feat_pos.tolist(), rep.feat_index.tolist()):
        sources.append({j: (p, acts[i][p, f] * clt.W_dec[i][f, j - i].detach()) for j in range(i, L)})
    sources += [{l: (p, clean[f"blocks.{l}.hook_mlp_out"][0, p] - recon[l][0, p])} for l in range(L)
                for p in range(n_pos)]
    sources += [{-1: (p, model.run_with_cache(tokens, ["hook_embed"]).cache["hook_embed"][0, p])}
                for p in range(n_pos)]
    assert any(len(s) > 1 for s in sources)  # cross-layer writes are in the comparison
    zero = lambda at: torch.zeros(1, n_pos, d, dtype=torch.float64)
    pre0, fin0 = _linearised(model, clt, tokens, clean, zero)
    expected = torch.zeros(graph.n_features + 3, len(sources), dtype=torch.float64)
    for s, writes in enumerate(sources):
        def perturb(at, writes=writes):
            v = torch.zeros(1, n_pos, d, dtype=torch.float64)
            if at in writes:
                v[0, writes[at][0]] = writes[at][1]
            return v
        pre, fin = _linearised(model, clt, tokens, clean, perturb)
        for t, (l, p, f) in enumerate(zip(rep.feat_layer.tolist(), rep.feat_pos.tolist(), rep.feat_index.tolist())):
            expected[t, s] = pre[l][p, f] - pre0[l][p, f]  # linear: a unit step is exact
        expected[graph.n_features:, s] = (fin - fin0) @ u
    got = torch.cat([graph.adjacency[: graph.n_features, : len(sources)],
                     graph.adjacency[graph.logit_slice, : len(sources)]])
    assert graph.n_features > 20 and expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-7)
    # an earlier feature reaches a later one through its cross-layer decoder as well: the edge differs from the
    # edge of the same CLT with only its own-layer decoders
    own = clt_from_set_of(clt)
    own_graph = attribute(model, own, tokens, max_logits=3, logit_prob=1.0)
    assert (own_graph.adjacency[: graph.n_features, : graph.n_features]
            - graph.adjacency[: graph.n_features, : graph.n_features]).abs().max() > 0.1


def clt_from_set_of(clt: CrossLayerTranscoder) -> CrossLayerTranscoder:
    """The same CLT with its cross-layer decoders zeroed."""
    own = type(clt)(clt.n_layers, clt.d_model, clt.d_sae, activation=clt.activation).double()
    own.load_state_dict(clt.state_dict())
    with torch.no_grad():
        for W in own.W_dec:
            W[:, 1:] = 0
    return own


def test_a_clt_that_does_not_fit_the_model_is_refused():
    model = toy()
    with pytest.raises(InterplabError, match="has 2 layers"):
        check_transcoders(model, CrossLayerTranscoder(2, 12, 8))
    with pytest.raises(InterplabError, match="width 10"):
        check_transcoders(model, CrossLayerTranscoder(3, 10, 8))
    wrong = CrossLayerTranscoder(3, 12, 8, in_hook="blocks.{layer}.hook_resid_mid")
    with pytest.raises(InterplabError, match="MLP's input and output"):
        attribute(model, wrong, prompt())
