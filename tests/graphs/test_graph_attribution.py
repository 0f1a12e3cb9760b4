"""Edge weights against finite differences in a separately built linearised replacement model, and the exact
transcoder's known answers (original logits, zero errors, completeness 1)."""

from __future__ import annotations

import torch

from graph_toys import exact_set, noisy_set, prompt, toy
from interplab.graphs.attribution import attribute, salient_logits
from interplab.graphs.replacement import replacement_logits, setup_replacement
from interplab.graphs.scores import graph_scores
from interplab.models import load_model


def _frozen_run(model, transcoders, tokens, clean, perturb):
    """The linearised replacement model, built from the clean cache alone: patterns and scales set to their clean
    values, each MLP output = its clean value + the skip term's change + `perturb(layer)`, the embedding + perturb(-1).
    Returns (pre-activations of every transcoder latent [layer][pos, d_sae], ln_final output at the last position)."""
    n_layers = model.info.n_layers
    reads: dict[str, torch.Tensor] = {}
    hooks = [(n, lambda a, n: clean[n]) for n in clean if n.endswith(("hook_pattern", "hook_scale"))]
    hooks.append(("hook_embed", lambda a, n: a + perturb(-1)))

    def read(a, n):
        reads[n] = a

    def out(a, n):
        layer = int(n.split(".")[1])
        tc = transcoders[layer]
        new = clean[n] + perturb(layer)
        if tc.W_skip is not None:
            new = new + (reads[f"blocks.{layer}.mlp.hook_in"] - clean[f"blocks.{layer}.mlp.hook_in"]) @ tc.W_skip
        return new

    for l in range(n_layers):
        hooks += [(f"blocks.{l}.mlp.hook_in", read), (f"blocks.{l}.hook_mlp_out", out)]
    hooks.append(("ln_final.hook_out", read))
    with torch.no_grad():
        model.run_with_hooks(tokens, hooks)
    pre = [(reads[f"blocks.{l}.mlp.hook_in"][0] @ transcoders[l].sae.W_enc).detach() for l in range(n_layers)]
    return pre, reads["ln_final.hook_out"][0, -1]


def test_edges_equal_finite_differences_in_the_linearised_model():
    model = toy()
    _check_finite_differences(model, noisy_set(model, skip_layer=1), prompt(), logits=True)


def test_edges_equal_finite_differences_on_hf_architectures(tiny_hf_dir):
    """GPT-2 (LayerNorm, position embeddings), Llama (RMSNorm, rotary, GQA), NeoX (parallel and sequential)."""
    model = load_model(str(tiny_hf_dir), device="cpu")
    model.model.double()  # float64, so that the comparison can be tight
    tokens = prompt(n=6, d_vocab=model.info.d_vocab, seed=3)
    _check_finite_differences(model, noisy_set(model, skip_layer=0), tokens, logits=False)


def _check_finite_differences(model, transcoders, tokens, logits: bool):
    graph = attribute(model, transcoders, tokens, max_logits=3, logit_prob=1.0, batch_size=5)
    rep = graph.rep
    n_layers, n_pos, d = model.info.n_layers, tokens.shape[1], model.info.d_model
    names = [n for n in model.hook_names if n.endswith(("hook_pattern", "hook_scale", "mlp.hook_in", "hook_mlp_out"))]
    clean = model.run_with_cache(tokens, names).cache
    if logits:
        W_U = model.W_U.detach()
        u = (W_U - W_U.mean(1, keepdim=True))[:, graph.logit_ids]  # [d, k]
    zero = lambda layer: torch.zeros(1, n_pos, d, dtype=torch.float64)
    pre0, fin0 = _frozen_run(model, transcoders, tokens, clean, zero)

    sources = [(int(rep.feat_layer[i]), int(rep.feat_pos[i]), rep.decoder_vecs[i]) for i in range(graph.n_features)]
    sources += [(l, p, rep.errors[l, p]) for l in range(n_layers) for p in range(n_pos)]
    sources += [(-1, p, rep.embeddings[p]) for p in range(n_pos)]
    # the model is linear here, so any step is exact; a large one keeps float32 rounding (HF's RMSNorm computes in
    # float32 even in a float64 model) small against the difference
    eps = 0.5 if logits else 1000.0
    expected = torch.zeros(graph.n_features + graph.logit_ids.shape[0], len(sources), dtype=torch.float64)
    for j, (layer, pos, vec) in enumerate(sources):
        def perturb(at, layer=layer, pos=pos, vec=vec):
            v = torch.zeros(1, n_pos, d, dtype=torch.float64)
            if at == layer:
                v[0, pos] = eps * vec
            return v
        pre, fin = _frozen_run(model, transcoders, tokens, clean, perturb)
        for i in range(graph.n_features):
            l, p, f = int(rep.feat_layer[i]), int(rep.feat_pos[i]), int(rep.feat_index[i])
            expected[i, j] = (pre[l][p, f] - pre0[l][p, f]) / eps
        if logits:
            expected[graph.n_features:, j] = (fin - fin0) @ u / eps

    n_src = len(sources)
    got = torch.cat([graph.adjacency[: graph.n_features, :n_src], graph.adjacency[graph.logit_slice, :n_src]])
    if not logits:
        got, expected = got[: graph.n_features], expected[: graph.n_features]
    assert expected.abs().max() > 0.1  # the comparison has something in it
    # float64 throughout for the toy; HF's RMSNorm rounds to float32 inside, in both computations
    tol = 1e-9 if logits else 1e-4 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=tol, rtol=1e-7 if logits else 1e-4)
    # no node feeds itself or anything earlier: features are sorted by layer, and the same layer has no edges
    same_or_later = rep.feat_layer[:, None] <= rep.feat_layer[None, :]
    assert not graph.adjacency[: graph.n_features, : graph.n_features][same_or_later].any()


def test_exact_transcoder_gives_the_original_logits_zero_errors_and_scores_of_one():
    model = toy()
    transcoders = exact_set(model)
    tokens = prompt()
    with torch.no_grad():
        real = model.forward(tokens)
    torch.testing.assert_close(replacement_logits(model, transcoders, tokens), real, atol=1e-12, rtol=0)
    rep = setup_replacement(model, transcoders, tokens)
    assert rep.errors.abs().max() < 1e-12
    # the active features are exactly the firing neurons
    n_firing = sum(int((model.run_with_cache(tokens, [f"blocks.{l}.mlp.hook_post"]).cache[f"blocks.{l}.mlp.hook_post"]
                        > 0).sum()) for l in range(3))
    assert rep.feat_layer.shape[0] == n_firing
    graph = attribute(model, transcoders, tokens)
    scores = graph_scores(graph.adjacency, graph.logit_probs, n_features=graph.n_features,
                          n_errors=3 * tokens.shape[1], n_tokens=tokens.shape[1])
    assert abs(scores.completeness - 1) < 1e-9 and abs(scores.replacement - 1) < 1e-9 and scores.error_share < 1e-9
    noisy = attribute(model, noisy_set(model), tokens)
    noisy_scores = graph_scores(noisy.adjacency, noisy.logit_probs, n_features=noisy.n_features,
                                n_errors=3 * tokens.shape[1], n_tokens=tokens.shape[1])
    assert noisy_scores.completeness < 0.9 and noisy_scores.error_share > 0.1


def test_noisy_replacement_logits_differ_without_errors_and_match_with_them():
    model = toy()
    transcoders = noisy_set(model)
    tokens = prompt()
    with torch.no_grad():
        real = model.forward(tokens)
    torch.testing.assert_close(replacement_logits(model, transcoders, tokens, with_errors=True), real,
                               atol=1e-10, rtol=0)
    assert (replacement_logits(model, transcoders, tokens) - real).abs().max() > 1e-2


def test_salient_logits_stop_at_the_cumulative_probability():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    ids, probs = salient_logits(logits, max_n=10, prob=0.8)
    assert ids.tolist() == [1, 2] and torch.allclose(probs, torch.tensor([0.5, 0.3], dtype=probs.dtype))
    assert salient_logits(logits, max_n=10, prob=0.81)[0].tolist() == [1, 2, 3]
    assert salient_logits(logits, max_n=1, prob=0.99)[0].tolist() == [1]


def test_bos_position_gets_no_feature_or_error_nodes(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), device="cpu")
    bos = model.tokenizer.bos_token_id
    transcoders = {l: tc.float() for l, tc in noisy_set(model).items()}
    tokens = torch.tensor([[bos, 5, 9, 7]])
    dropped = setup_replacement(model, transcoders, tokens, zero_bos=True)
    kept = setup_replacement(model, transcoders, tokens, zero_bos=False)
    assert (kept.feat_pos == 0).any() and not (dropped.feat_pos == 0).any()
    assert kept.errors[:, 0].abs().max() > 0 and dropped.errors[:, 0].abs().max() == 0
    assert torch.equal(dropped.errors[:, 1:], kept.errors[:, 1:])
    # a first token that is not special keeps its nodes
    assert (setup_replacement(model, transcoders, tokens[:, 1:], zero_bos=True).feat_pos == 0).any()
