"""A planted path: token A fires feature 3 of layer 0, whose output feature 5 of layer 1 reads, which writes token
B's logit. The graph must route the prediction through it, and zeroing feature 3 in the real model must take B's
lead away."""

from __future__ import annotations

import torch

from graph_toys import exact_set
from interplab.graphs.attribution import attribute
from interplab.graphs.controls import control_transcoders
from interplab.graphs.graph_json import node_ids, top_paths
from interplab.graphs.interventions import Clamp, logit_effects
from interplab.graphs.prune import prune_graph
from interplab.graphs.scores import graph_scores
from interplab.models import ToyConfig, ToyTransformer

A, B, U, V = 2, 6, 8, 9  # tokens A, B; residual directions u (feature 3's output), v (feature 5's output)
N_POS = 6


def planted_model() -> ToyTransformer:
    """Vocabulary 8, d_model 12: token t embeds on e_t; small random weights elsewhere (other neurons fire too)."""
    model = ToyTransformer(ToyConfig(n_layers=2, d_model=12, n_heads=2, d_head=4, d_mlp=8, n_ctx=8, d_vocab=8,
                                     act_fn="relu", init_std=0.08, seed=3)).double()
    eye = torch.eye(12, dtype=torch.float64)
    with torch.no_grad():
        model.W_E[:, :8] += 2 * torch.eye(8, dtype=torch.float64)
        m0, m1 = model.blocks[0].mlp, model.blocks[1].mlp
        m0.W_in[:, 3] = eye[A]; m0.b_in[3] = -0.5; m0.W_out[3] = 3 * eye[U]     # fires on A, writes u
        m1.W_in[:, 5] = eye[U]; m1.b_in[5] = -0.5; m1.W_out[5] = 3 * eye[V]     # reads u, writes v
        model.W_U[:, B] += 2 * eye[V]                                          # v is B's logit
    return model.eval()


def test_the_prediction_runs_through_the_planted_path():
    model = planted_model()
    tokens = torch.tensor([[1, 4, 0, 7, 5, A]])
    logits = model.forward(tokens)[0, -1]
    assert int(logits.argmax()) == B
    transcoders = exact_set(model)
    graph = attribute(model, transcoders, tokens, max_logits=3)
    assert int(graph.logit_ids[0]) == B
    pruned = prune_graph(graph.adjacency, graph.logit_probs, n_features=graph.n_features, n_tokens=N_POS)
    ids = node_ids(graph)
    kept = {ids[i] for i in pruned.node_mask.nonzero()[:, 0].tolist()}
    last = N_POS - 1
    path = [f"emb:{last}", f"f:0:{last}:3", f"f:1:{last}:5", f"logit:{B}"]
    assert set(path) <= kept
    best = top_paths(graph, pruned, ids.index(f"logit:{B}"), k=3)[0]
    assert [ids[i] for i in best.nodes] == path
    # the planted features are the most influential feature nodes
    feature_influence = pruned.influence[: graph.n_features]
    top2 = {ids[i] for i in feature_influence.topk(2).indices.tolist()}
    assert top2 == {f"f:0:{last}:3", f"f:1:{last}:5"}

    # zeroing feature 3 in the real model: u is not written, feature 5 stays off, B loses its lead
    effects = logit_effects(model, transcoders, tokens, [Clamp(0, last, 3, 0.0)], [B])
    assert effects.delta[0] < -4
    g = _control_graph(model, transcoders, tokens)
    control = graph_scores(g.adjacency, g.logit_probs, n_features=g.n_features, n_errors=2 * N_POS, n_tokens=N_POS)
    exact = graph_scores(graph.adjacency, graph.logit_probs, n_features=graph.n_features, n_errors=2 * N_POS,
                         n_tokens=N_POS)
    assert exact.completeness > 0.999 and control.completeness < 0.8


def _control_graph(model, transcoders, tokens):
    return attribute(model, control_transcoders(transcoders, seed=0), tokens, max_logits=3)
