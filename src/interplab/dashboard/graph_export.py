"""An attribution graph in Neuronpedia's graph JSON: the file circuit-tracer's `create_graph_files` writes and
Neuronpedia's graph viewer (and its upload, `neuronpedia.np_graph_metadata`) reads.

Field names and conventions follow circuit-tracer's `frontend/graph_models.py` and `utils/create_graph_files.py`
(safety-research/circuit-tracer, schema_version 1) and Neuronpedia's graph JSON Schema
(apps/webapp/app/api/graph/graph-schema.json): read from those sources, nothing copied.

    {"metadata": {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold", "schema_version",
                  "info": {"generator": {...}}, "pruning_settings": {"node_threshold", "edge_threshold"}},
     "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
     "nodes": [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}],
     "links": [{"source", "target", "weight"}]}

What maps to what (interplab node -> Neuronpedia node; L = n_layers, v = vocabulary id, p = position):
    feature f:{l}:{p}:{f}  node_id "{l}_{f}_{p}", feature = Cantor pairing (l + f)(l + f + 1)/2 + f, layer "{l}",
                           feature_type "cross layer transcoder" (circuit-tracer writes it for per-layer
                           transcoders too; Neuronpedia's viewer keys on it), jsNodeId "{l}_{f}-0", clerp = label
    error err:{l}:{p}      node_id "{l}_-1_{p}", feature -1, feature_type "mlp reconstruction error",
                           jsNodeId "{l}_{p}-0", clerp ""
    embedding emb:{p}      node_id "E_{v}_{p}", feature p, layer "E", feature_type "embedding", jsNodeId "E_{v}-{p}"
    logit logit:{v}        node_id "{L+1}_{v}_{p}", feature v, layer "{L+1}" (circuit-tracer's numbering),
                           token_prob = prob, is_target_logit for the most probable, jsNodeId "L_{v}-{p}",
                           clerp 'Output "{token}" (p=0.123)'
Nodes are listed as circuit-tracer lists them: features, errors, embeddings, logits.

influence: circuit-tracer writes each node's *cumulative* influence (the share of the total influence held by the
nodes ranked at or above it, strongest first), which Neuronpedia compares with `node_threshold` to prune live. The
graph JSON holds each node's own influence, so it is converted here over the feature, error and embedding nodes of
the graph (already pruned: shares of what was kept, where circuit-tracer ranks the unpruned graph); logits get
null, as in circuit-tracer. A graph whose non-logit nodes all carry an optional "cumulative" (that share, ranked
over the unpruned graph as circuit-tracer does) has it written as is. Token ids of the prompt come from the graph's optional "token_ids"; without them the
embedding nodes get vocabulary id -1 (their positions keep the ids unique). Tokens are shown with circuit-tracer's
`process_token` (newline -> ⏎, tab -> →, carriage return -> ↵).
"""

from __future__ import annotations

import json
import re
from typing import Any

from interplab import __version__
from interplab.dashboard.graph_page import check_graph
from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic

FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                 "embedding": "embedding", "logit": "logit"}
"""Neuronpedia's feature_type of each interplab node type."""
GENERATOR = {"name": "interplab", "version": __version__}
"""metadata.info.generator: who wrote the graph (Neuronpedia shows it; the schema also allows a url, unknown here)."""
_ORDER = ("feature", "error", "embedding", "logit")
_SLUG_RE = re.compile(r"[^a-z0-9-]+")


def process_token(token: str) -> str:
    """A token as circuit-tracer shows it: newline, tab and carriage return made visible."""
    return token.replace("\n", "\u23ce").replace("\t", "\u2192").replace("\r", "\u21b5")


def cantor_pair(x: int, y: int) -> int:
    """Cantor's pairing (x + y)(x + y + 1)/2 + y: one integer per (layer, feature), as circuit-tracer numbers
    transcoder features for Neuronpedia."""
    return (x + y) * (x + y + 1) // 2 + y


def cumulative_influence(influences: dict[str, float]) -> dict[str, float]:
    """Each node's share of the total |influence| held by the nodes ranked at or above it (strongest first, ties by
    id): c_i = sum_{j <= i} |I_j| / sum_j |I_j| (0 for every node when the total is 0)."""
    ranked = sorted(influences, key=lambda k: (-abs(influences[k]), k))
    total = sum(abs(v) for v in influences.values())
    out, acc = {}, 0.0
    for k in ranked:
        acc += abs(influences[k])
        out[k] = acc / total if total > 0 else 0.0
    return out


def _vocab_id(node: dict) -> int:
    try:
        return int(node["id"].split(":", 1)[1])
    except (IndexError, ValueError):
        raise InterplabError(f"logit node id {node['id']!r} holds no token id; valid: 'logit:{{token_id}}'") from None


def _slug(text: str) -> str:
    return _SLUG_RE.sub("-", text.lower()).strip("-")


def _node(node: dict, *, n_layers: int, token_ids: list[int] | None, influence: float | None,
          target: bool) -> dict[str, Any]:
    kind, layer, pos = node["type"], node["layer"], node["pos"]
    out: dict[str, Any] = {"feature_type": FEATURE_TYPES[kind], "ctx_idx": pos, "token_prob": 0.0,
                           "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
                           "influence": influence, "activation": None}
    if kind == "feature":
        f = node["feature"]
        out.update(node_id=f"{layer}_{f}_{pos}", feature=cantor_pair(layer, f), layer=str(layer),
                   jsNodeId=f"{layer}_{f}-0", clerp=node.get("label") or "", activation=node.get("activation"))
    elif kind == "error":
        out.update(node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), jsNodeId=f"{layer}_{pos}-0")
    elif kind == "embedding":
        v = token_ids[pos] if token_ids is not None else -1
        out.update(node_id=f"E_{v}_{pos}", feature=pos, layer="E", jsNodeId=f"E_{v}-{pos}")
    else:
        v, prob = _vocab_id(node), node.get("prob") or 0.0
        token = process_token(node.get("token") if node.get("token") is not None else node.get("label", ""))
        out.update(node_id=f"{n_layers + 1}_{v}_{pos}", feature=v, layer=str(n_layers + 1), jsNodeId=f"L_{v}-{pos}",
                   token_prob=prob, is_target_logit=target, clerp=f'Output "{token}" (p={prob:.3f})')
    return out


def neuronpedia_graph(graph: dict, *, slug: str, scan: str | None = None,
                      transcoder_list: list[str] | None = None) -> dict[str, Any]:
    """The Neuronpedia graph JSON object of `graph` (see the module docstring for the mapping)."""
    check_graph(graph)
    token_ids = graph.get("token_ids")
    if token_ids is not None and (not isinstance(token_ids, list) or len(token_ids) != len(graph["tokens"])
                                  or not all(isinstance(t, int) for t in token_ids)):
        raise InterplabError(f"the graph's token_ids must be {len(graph['tokens'])} ints, one per token")
    nodes = sorted(graph["nodes"], key=lambda n: _ORDER.index(n["type"]))
    ranked = [n for n in nodes if n["type"] != "logit"]
    if ranked and all(isinstance(n.get("cumulative"), (int, float)) for n in ranked):
        shares = {n["id"]: float(n["cumulative"]) for n in ranked}  # the graph's own, over the unpruned graph
    else:
        shares = cumulative_influence({n["id"]: n["influence"] for n in ranked})
    logits = [n for n in nodes if n["type"] == "logit"]
    target = max(logits, key=lambda n: n.get("prob") or 0.0)["id"] if logits else None
    out_nodes = {n["id"]: _node(n, n_layers=graph["n_layers"], token_ids=token_ids, influence=shares.get(n["id"]),
                                target=n["id"] == target) for n in nodes}
    pruning = graph.get("pruning") or {}
    metadata: dict[str, Any] = {
        "slug": slug, "scan": scan if scan is not None else str(graph.get("model", "")),
        "transcoder_list": list(transcoder_list or []),
        "prompt_tokens": [process_token(t) for t in graph["tokens"]], "prompt": graph.get("prompt", ""),
        "node_threshold": pruning.get("node_threshold"), "schema_version": 1, "info": {"generator": GENERATOR},
        "pruning_settings": {k: pruning[k] for k in ("node_threshold", "edge_threshold") if k in pruning},
    }
    return {"metadata": metadata,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": list(out_nodes.values()),
            "links": [{"source": out_nodes[e["source"]]["node_id"], "target": out_nodes[e["target"]]["node_id"],
                       "weight": e["weight"]} for e in graph["edges"]]}


def export_neuronpedia_graph(graph: dict, path: str, *, slug: str | None = None, scan: str | None = None,
                             transcoder_list: list[str] | None = None) -> dict[str, Any]:
    """Write `graph` (the "attribution_graph" JSON) to `path` (a local path or fsspec URL, written atomically) in
    Neuronpedia's graph JSON, ready for its upload; return the object written.

    `slug` (the graph's name on Neuronpedia: lowercase letters, digits and dashes) defaults to the file's name;
    `scan` (Neuronpedia's model id, e.g. "gemma-2-2b") to the graph's "model"; `transcoder_list` names the
    transcoders used (circuit-tracer writes it for custom transcoder sets). Checked before anything is written.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1]
    chosen = slug if slug is not None else _slug(name[:-5] if name.endswith(".json") else name)
    if not chosen or _slug(chosen) != chosen:
        raise InterplabError(f"slug {chosen!r} is not usable on Neuronpedia; valid: lowercase letters, digits and "
                             "dashes, e.g. 'capital-of-texas'")
    out = neuronpedia_graph(graph, slug=chosen, scan=scan, transcoder_list=transcoder_list)
    write_url_atomic(path, json.dumps(out, ensure_ascii=False, allow_nan=False, indent=1).encode("utf-8"))
    return out
