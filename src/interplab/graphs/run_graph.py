"""`interplab graph`: the attribution graph of a prompt through per-layer transcoders or a cross-layer transcoder,
beside the control.

Writes the run folder: OUT/config.json, OUT/graph.json (the pruned graph; schema in graph_json.py),
OUT/metrics.json (scores beside the control's, node and edge counts, the top paths, and zeroing checks of the most
influential features in the real model) and OUT/report.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict

import torch

from interplab.data import iter_contexts
from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic
from interplab.graphs.attribution import AttributionGraph, attribute
from interplab.graphs.configs import GraphConfig
from interplab.graphs.controls import control_transcoders
from interplab.graphs.graph_json import graph_to_json, node_ids, top_paths
from interplab.graphs.interventions import Clamp, logit_effects
from interplab.graphs.predict import predicted_logit_change
from interplab.graphs.prune import PruneResult, prune_graph
from interplab.graphs.scores import GraphScores, graph_scores
from interplab.graphs.top_examples import attach_examples, kept_features, top_examples
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.models.tokens import token_text
from interplab.runs import JSONDict, Run, write_json
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.mlp_dictionary import Dictionary, check_transcoders
from interplab.sae.transcoder_files import load_transcoder_set

KIND = "graph"
N_CHECKS = 5
"""Most influential features zeroed in the real model, each beside the graph's prediction."""


def prompt_tokens(model: HookedModel, prompt: str) -> torch.Tensor:
    """Token ids of the prompt after BOS (when the tokenizer has one); for a model without a tokenizer, the prompt
    is the token ids themselves, separated by spaces."""
    tok = model.tokenizer
    if tok is None:
        try:
            ids = [int(x) for x in prompt.split()]
        except ValueError:
            raise InterplabError(f"{model.info.spec} has no tokenizer: give --prompt as token ids separated by "
                                 f"spaces, got {prompt!r}") from None
    else:
        ids = list(tok([prompt], add_special_tokens=False)["input_ids"][0])
        bos = getattr(tok, "bos_token_id", None)
        ids = ids if bos is None else [bos, *ids]
    return model.check_tokens(torch.tensor([ids]))


def load_transcoders(path: str, model: HookedModel) -> Dictionary:
    """The per-layer transcoders or the cross-layer transcoder in folder `path`, on the model's device."""
    loaded = load_transcoder_set(path)
    if isinstance(loaded, CrossLayerTranscoder):
        return loaded.to(model.device)
    return {layer: tc.to(model.device) for layer, tc in loaded.transcoders.items()}


def example_contexts(cfg: GraphConfig, model: HookedModel) -> Iterator[torch.Tensor] | None:
    """The corpus contexts of the top-activation search (None when it is off or the model has no tokenizer); a bad
    corpus spec or a --ctx-len beyond the model's context is refused here, before any work."""
    if cfg.examples_contexts == 0 or model.tokenizer is None:
        return None
    if cfg.ctx_len > model.info.n_ctx:
        raise InterplabError(f"--ctx-len {cfg.ctx_len} exceeds {model.info.spec}'s context length "
                             f"{model.info.n_ctx}; valid: 2..{model.info.n_ctx} (or --examples-contexts 0)")
    return iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split=cfg.split, seed=cfg.seed,
                         test_fraction=cfg.test_fraction)


def add_top_examples(cfg: GraphConfig, model: HookedModel, transcoders: Dictionary, graph: AttributionGraph,
                     pruned: PruneResult, contexts: Iterator[torch.Tensor] | None, graph_json: JSONDict) -> JSONDict:
    """Give the kept feature nodes of graph.json their top activating contexts; what was done, for metrics.json."""
    if contexts is None:
        why = "--examples-contexts 0" if cfg.examples_contexts == 0 else f"{model.info.spec} has no tokenizer"
        return {"skipped": why}
    features = kept_features(graph, pruned, cfg.examples_features)
    bos = getattr(model.tokenizer, "bos_token_id", None) if cfg.zero_bos else None
    found = top_examples(model, transcoders, features, contexts, n_contexts=cfg.examples_contexts, k=cfg.examples_k,
                         window=cfg.examples_window, batch_size=cfg.examples_batch_size, skip_token=bos)
    n_nodes = attach_examples(graph_json, found.examples)
    return {"corpus": cfg.corpus, "contexts": found.n_contexts, "ctx_len": cfg.ctx_len, "features": len(features),
            "features_firing": sum(1 for ex in found.examples.values() if ex), "nodes": n_nodes}


def scores_of(graph: AttributionGraph) -> GraphScores:
    return graph_scores(graph.adjacency, graph.logit_probs, n_features=graph.n_features,
                        n_errors=graph.n_layers * graph.n_pos, n_tokens=graph.n_pos)


def run_graph(cfg: GraphConfig, *, model: HookedModel | None = None,
              transcoders: Dictionary | None = None) -> JSONDict:
    """Attribute, prune, score beside the control, write the run folder, return the metrics (a complete run is not
    redone)."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:
            return run.metrics
        model = model or load_model(cfg.model, device=cfg.device)
        transcoders = transcoders if transcoders is not None else load_transcoders(cfg.transcoders, model)
        check_transcoders(model, transcoders)
        tokens = prompt_tokens(model, cfg.prompt)
        contexts = example_contexts(cfg, model)  # the corpus is checked before the attribution's work
        opts = dict(max_logits=cfg.max_logits, logit_prob=cfg.logit_prob, batch_size=cfg.batch_size,
                    zero_bos=cfg.zero_bos)
        start = time.perf_counter()
        graph = attribute(model, transcoders, tokens, **opts)
        seconds = time.perf_counter() - start
        control_scores = scores_of(attribute(model, control_transcoders(transcoders, cfg.control_seed), tokens,
                                             **opts))  # only its scores are kept: its adjacency is as large
        pruned = prune_graph(graph.adjacency, graph.logit_probs, n_features=graph.n_features, n_tokens=graph.n_pos,
                             node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold)
        texts = [token_text(model.tokenizer, t) for t in tokens[0].tolist()]
        logit_texts = [token_text(model.tokenizer, t) for t in graph.logit_ids.tolist()]
        scores = scores_of(graph)
        graph_json = graph_to_json(
            graph, pruned, model=model.info.spec, prompt=cfg.prompt, tokens=texts, logit_tokens=logit_texts,
            scores=scores, control=control_scores, node_threshold=cfg.node_threshold,
            edge_threshold=cfg.edge_threshold)
        examples_note = add_top_examples(cfg, model, transcoders, graph, pruned, contexts, graph_json)
        write_json(run.path("graph.json"), graph_json)
        result = summarise(graph, pruned, scores, control_scores, cfg.top_paths)
        result["top_examples"] = examples_note
        result["checks"] = zeroing_checks(model, transcoders, tokens, graph, pruned)
        result.update({"config": asdict(cfg), "model": model.info.to_dict(), "tokens": texts,
                       "logit_tokens": logit_texts, "attribution_seconds": seconds,
                       "n_active_features": graph.n_features})
        write_url_atomic(run.path("report.md"), format_report(result).encode())
        run.write_metrics(result)
        return {"kind": KIND, **result}


def summarise(graph: AttributionGraph, pruned: PruneResult, scores: GraphScores, control: GraphScores,
              n_paths: int) -> JSONDict:
    """Scores, counts and the top paths to the top logit."""
    ids = node_ids(graph)
    top = graph.logit_slice.start
    paths = [{"nodes": [ids[i] for i in p.nodes], "share": p.share,
              "weights": [float(graph.adjacency[t, s]) for s, t in zip(p.nodes, p.nodes[1:])]}
             for p in top_paths(graph, pruned, top, n_paths)]
    kept = pruned.node_mask
    return {"scores": scores.to_dict(), "control": control.to_dict(),
            "n_nodes": int(graph.adjacency.shape[0]), "n_nodes_kept": int(kept.sum()),
            "n_features_kept": int(kept[: graph.n_features].sum()), "n_edges_kept": int(pruned.edge_mask.sum()),
            "top_logit": ids[top], "top_prob": float(graph.logit_probs[0]), "top_paths": paths}


def zeroing_checks(model: HookedModel, transcoders: Dictionary, tokens: torch.Tensor,
                   graph: AttributionGraph, pruned: PruneResult) -> list[JSONDict]:
    """Zero each of the most influential kept features in the real model; its change of the top logit (against the
    mean logit) beside what the graph predicts."""
    rep, ids = graph.rep, node_ids(graph)
    influence = torch.where(pruned.node_mask[: graph.n_features], pruned.influence[: graph.n_features],
                            torch.zeros(graph.n_features, dtype=pruned.influence.dtype))
    order = influence.argsort(descending=True)[: min(N_CHECKS, int((influence > 0).sum()))].tolist()
    top_id = int(graph.logit_ids[0])
    checks = []
    for i in order:
        clamp = Clamp(int(rep.feat_layer[i]), int(rep.feat_pos[i]), int(rep.feat_index[i]), 0.0)
        real = logit_effects(model, transcoders, tokens, [clamp], [top_id])
        checks.append({"node": ids[i], "graph_delta": predicted_logit_change(graph, i, 0),
                       "model_delta": real.delta_vs_mean[0]})
    return checks


def format_report(result: Mapping) -> str:
    """report.md: the scores beside the control, the error share, the top paths and the zeroing checks."""
    s, c = result["scores"], result["control"]
    lines = [f"# Attribution graph: {result['config']['prompt']!r}", "",
             f"Model {result['model']['spec']}; top prediction {result['logit_tokens'][0]!r} ({result['top_logit']}, "
             f"p = {result['top_prob']:.3f}); "
             f"{result['n_active_features']} active features, {result['n_features_kept']} kept after pruning "
             f"({result['n_nodes_kept']} nodes, {result['n_edges_kept']} edges).", "",
             "| score | transcoders | random control |", "|---|---|---|"]
    lines += [f"| {name} | {s[name]:.3f} | {c[name]:.3f} |" for name in ("replacement", "completeness", "error_share")]
    lines += ["", "Replacement: share of the inputs' influence on the logits not passing through error nodes. "
              "Completeness: influence-weighted share of node inputs that are not errors. Error share: errors' part "
              "of all node influence. The control uses random directions of the same norms.", "",
              f"## Top paths to {result['top_logit']}", ""]
    lines += [f"{i + 1}. {' → '.join(p['nodes'])} (share {p['share']:.3f})"
              for i, p in enumerate(result["top_paths"])]
    lines += ["", "## Zeroing the most influential features in the real model", "",
              "| feature | graph predicts Δ(logit − mean) | real model Δ(logit − mean) |", "|---|---|---|"]
    lines += [f"| {ch['node']} | {ch['graph_delta']:+.3f} | {ch['model_delta']:+.3f} |" for ch in result["checks"]]
    return "\n".join(lines) + "\n"


def format_summary(result: Mapping) -> str:
    """The scores beside the control, what pruning kept, and the top path to the top logit."""
    s, c = result["scores"], result["control"]
    lines = [f"replacement {s['replacement']:.3f} (random dictionary {c['replacement']:.3f}), completeness "
             f"{s['completeness']:.3f} ({c['completeness']:.3f}), error share {s['error_share']:.3f}",
             f"{result['n_active_features']} active features; kept {result['n_features_kept']} features, "
             f"{result['n_nodes_kept']} nodes, {result['n_edges_kept']} edges; top logit {result['top_logit']} "
             f"(p = {result['top_prob']:.3f})"]
    if result["top_paths"]:
        path = result["top_paths"][0]
        lines.append(f"top path ({path['share']:.2f} of the influence): " + " → ".join(path["nodes"]))
    ex = result.get("top_examples") or {}
    if "skipped" in ex:
        lines.append(f"top activations: none ({ex['skipped']})")
    elif ex:
        lines.append(f"top activations: {ex['features_firing']} of {ex['features']} features fire in {ex['contexts']} "
                     f"contexts of {ex['corpus']}")
    return "\n".join(lines)
