"""graph.json (the schema the viewer and the Neuronpedia export read) and the top paths to a logit.

Node ids: "emb:{pos}", "err:{layer}:{pos}", "f:{layer}:{pos}:{feature}", "logit:{token_id}"; an edge
{"source", "target", "weight"} is the direct effect A[target, source] of the source on the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from interplab.graphs.attribution import AttributionGraph
from interplab.graphs.prune import PruneResult, normalize_matrix
from interplab.graphs.scores import GraphScores
from interplab.runs import JSONDict


class Path(NamedTuple):
    nodes: list[int]
    """Node indices from a source (token or error) to the logit."""
    share: float
    """Π of the edges' shares of their targets' inputs: the path's part of the source's influence on the logit."""


def node_ids(graph: AttributionGraph) -> list[str]:
    """The id of every node, in the adjacency's order."""
    rep = graph.rep
    ids = [f"f:{l}:{p}:{i}" for l, p, i in zip(rep.feat_layer.tolist(), rep.feat_pos.tolist(),
                                                rep.feat_index.tolist())]
    ids += [f"err:{l}:{p}" for l in range(graph.n_layers) for p in range(graph.n_pos)]
    ids += [f"emb:{p}" for p in range(graph.n_pos)]
    return ids + [f"logit:{t}" for t in graph.logit_ids.tolist()]


def _node(graph: AttributionGraph, index: int, node_id: str, influence: float, tokens: Sequence[str],
          logit_tokens: Sequence[str]) -> JSONDict:
    rep, kind = graph.rep, node_id.split(":")[0]
    base: JSONDict = {"id": node_id, "feature": None, "activation": None, "token": None, "prob": None,
                      "dashboard": None, "influence": influence}
    if kind == "f":
        l, p, i = (int(x) for x in node_id.split(":")[1:])
        return {**base, "type": "feature", "layer": l, "pos": p, "feature": i,
                "activation": float(rep.feat_act[index]), "label": f"L{l} F{i} @{p} {tokens[p]!r}"}
    if kind == "err":
        l, p = (int(x) for x in node_id.split(":")[1:])
        return {**base, "type": "error", "layer": l, "pos": p, "label": f"L{l} error @{p}",
                "activation": float(rep.errors[l, p].norm())}
    if kind == "emb":
        p = int(node_id.split(":")[1])
        return {**base, "type": "embedding", "layer": -1, "pos": p, "token": tokens[p], "label": f"{tokens[p]!r} @{p}"}
    k = index - graph.logit_slice.start
    prob = float(graph.logit_probs[k])
    return {**base, "type": "logit", "layer": graph.n_layers, "pos": graph.n_pos - 1, "token": logit_tokens[k],
            "prob": prob, "influence": prob, "label": f"{logit_tokens[k]!r} (p={prob:.3f})"}


def graph_to_json(graph: AttributionGraph, pruned: PruneResult, *, model: str, prompt: str, tokens: Sequence[str],
                  logit_tokens: Sequence[str], scores: GraphScores, control: GraphScores, node_threshold: float,
                  edge_threshold: float) -> JSONDict:
    """The pruned graph as graph.json (logit nodes carry their probability as influence). Beyond the contract's
    fields: each node's "cumulative" (its influence rank as the share of total influence up to it, over the unpruned
    graph, as circuit-tracer writes it) and the prompt's "token_ids", which the Neuronpedia export reads."""
    ids = node_ids(graph)
    keep = pruned.node_mask.nonzero()[:, 0].tolist()
    nodes = [{**_node(graph, i, ids[i], float(pruned.influence[i]), tokens, logit_tokens),
              "cumulative": float(pruned.cumulative[i])} for i in keep]
    edges = [{"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])}
             for t, s in pruned.edge_mask.nonzero().tolist()]
    return {"kind": "attribution_graph", "version": 1, "model": model, "prompt": prompt, "tokens": list(tokens),
            "token_ids": graph.rep.tokens[0].tolist(),
            "n_layers": graph.n_layers, "nodes": nodes, "edges": edges, "scores": scores.to_dict(),
            "control": control.to_dict(),
            "pruning": {"node_threshold": node_threshold, "edge_threshold": edge_threshold,
                        "n_nodes_before": int(graph.adjacency.shape[0]),
                        "n_edges_before": int((graph.adjacency != 0).sum())}}


def top_paths(graph: AttributionGraph, pruned: PruneResult, target: int, k: int) -> list[Path]:
    """The k paths into node `target` with the largest share products, over the pruned graph's edges.

    Shares are the pruned graph's row-normalised |A| (prune.py), so summing the products over all paths from a
    source gives that source's influence on the target: the top paths are the largest terms of that sum.
    """
    shares = normalize_matrix(torch.where(pruned.edge_mask, graph.adjacency, torch.zeros_like(graph.adjacency)))
    memo: dict[int, list[Path]] = {}

    def best(node: int) -> list[Path]:  # the top k paths ending at `node`; the graph is acyclic
        if node not in memo:
            inputs = pruned.edge_mask[node].nonzero()[:, 0].tolist()
            if not inputs:
                memo[node] = [Path([node], 1.0)]
            else:
                found = [Path(p.nodes + [node], p.share * float(shares[node, s])) for s in inputs for p in best(s)]
                memo[node] = sorted(found, key=lambda p: -p.share)[:k]
        return memo[node]

    return [p for p in best(target) if len(p.nodes) > 1][:k] if k > 0 else []
