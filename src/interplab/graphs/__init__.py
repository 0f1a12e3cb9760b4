"""Attribution graphs through per-layer or cross-layer transcoders: which features drive a prediction, and how much
the errors do.

    from interplab.graphs import attribute, prune_graph, graph_scores, control_transcoders, logit_effects
    graph = attribute(model, transcoders, tokens)             # {layer: Transcoder} or a CrossLayerTranscoder
    pruned = prune_graph(graph.adjacency, graph.logit_probs, n_features=graph.n_features, n_tokens=graph.n_pos)

- per-layer transcoders and a cross-layer transcoder behind one interface: `interplab.sae.mlp_dictionary`
  (`Dictionary`, `as_dictionary`, `check_transcoders`).
- replacement.py: the replacement model of a prompt (frozen patterns and scales, transcoders + error nodes).
- attribution.py: edge weights, one backward pass per batch of target nodes.
- prune.py: pruning by indirect influence on the logits; scores.py: replacement, completeness, error share.
- controls.py: the norm-matched random dictionary whose graph is the floor.
- interventions.py: clamp or zero features in the real model and read the logits; predict.py: what the graph
  predicts for the same zeroing.
- graph_json.py, run_graph.py, configs.py: graph.json, report.md and the command `graph`.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["GraphConfig"],
        "replacement": ["Dictionary", "Replacement", "as_dictionary", "setup_replacement", "replacement_logits",
                        "check_transcoders"],
        "attribution": ["AttributionGraph", "attribute", "salient_logits"],
        "prune": ["PruneResult", "prune_graph"],
        "scores": ["GraphScores", "graph_scores"],
        "controls": ["control_transcoders", "norm_matched_random", "norm_matched_random_clt"],
        "interventions": ["Clamp", "intervene", "logit_effects"],
        "predict": ["predicted_logit_change"],
        "graph_json": ["graph_to_json", "top_paths"],
        "run_graph": ["run_graph"],
    },
)
