"""`interplab weights svd`: a matrix's top singular directions read through the vocabulary, beside random directions.

    interplab weights svd --what ov --layer 3 --head 2     one head's OV circuit
    interplab weights svd --what all --layer 3             every kind of matrix at layer 3 (heads pooled), compared

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json (every direction's top and bottom
tokens, the proxies, the control) and OUT/figures/.
For OV circuits it also reports each head's copying score (eigenvalues of the full circuit E W_OV U).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch

from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.runs import JSONDict, Run
from interplab.weights.circuits import copying_score, full_ov_circuit
from interplab.weights.configs import MATRICES, PER_HEAD, SVDConfig
from interplab.weights.extract import attention_weights, embedding, mlp_weights, normalize, unembedding
from interplab.weights.factored import FactoredMatrix
from interplab.weights.svd_figures import proxy_bars, spectra
from interplab.weights.svd_read import (Vocabulary, check_matrix, matrix_directions, proxy_summary,
                                        random_directions, read_directions, vocabulary)

KIND = "weights svd"
"""The command, as recorded in config.json and metrics.json."""
SHOWN_TOKENS = 6
"""Tokens per end printed in the summary (metrics.json has --top-k)."""


def run_svd(cfg: SVDConfig, *, model: HookedModel | None = None) -> JSONDict:
    """Read every requested matrix, with the random-direction control; write OUT/metrics.json and the figures and
    return the metrics. A complete run with the same config in OUT is reported as done, not recomputed."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not recompute
            return run.metrics
        model = model or load_model(cfg.model, device=cfg.device)
        kinds = _kinds(cfg, model)
        for kind in kinds:  # with --what all, --head picks the ov/qk head and the other kinds ignore it
            check_matrix(model, kind, cfg.layer, cfg.head if kind in PER_HEAD or cfg.what != "all" else None)
        vocab = vocabulary(model)
        control = read_directions(vocab, random_directions(model.info.d_model, cfg.controls, cfg.seed), cfg.top_k)
        result: dict[str, Any] = {"config": asdict(cfg), "control": proxy_summary(control), "matrices": {}}
        for kind in kinds:
            result["matrices"][kind] = _read_kind(cfg, model, vocab, kind)
        if "ov" in kinds:
            result["copying"] = copying_scores(model, cfg.layer, cfg.seed)
        result["figures"] = {
            "spectra": spectra(result["matrices"], run.figure("spectra")),
            "proxies": proxy_bars(result["matrices"], result["control"], run.figure("proxies")),
        }
        run.write_metrics(result)
        return {"kind": KIND, **result}


def _kinds(cfg: SVDConfig, model: HookedModel) -> list[str]:
    if cfg.what != "all":
        return [cfg.what]
    if model.info.d_mlp is None:
        return ["ov", "qk", "embed", "unembed"]
    gated = mlp_weights(model, cfg.layer).W_gate is not None
    return [k for k in MATRICES if k != "mlp-gate" or gated]


def _read_kind(cfg: SVDConfig, model: HookedModel, vocab: Vocabulary, kind: str) -> dict[str, Any]:
    """Every matrix of one kind (one per head for ov/qk): spectrum, readings, and the proxies pooled over them."""
    entries, pooled = [], []
    head = cfg.head if kind in PER_HEAD else None
    for found in matrix_directions(model, kind, cfg.layer, head, cfg.directions):
        directions = []
        for side, vectors in found.sides.items():
            for i, reading in enumerate(read_directions(vocab, vectors, cfg.top_k)):
                pooled.append(reading)
                directions.append({"index": i, "side": side, "sigma": float(found.S[i]), **reading._asdict()})
        entries.append({"name": found.name, "singular_values": found.S.tolist(), "directions": directions})
    return {"entries": entries, "proxies": proxy_summary(pooled)}


def copying_scores(model: HookedModel, layer: int, seed: int) -> dict[str, list[float]]:
    """Each head's copying score Σ Re λ / Σ |λ| of its full OV circuit Ê W_OV U, beside random circuits.

    Ê is the embedding normalised like the residual stream (`extract.normalize`, without the norm's scale, which is
    folded into W_V): a token's own embedding as the head reads it, so the circuit is the head's direct path at
    layer 0 and an approximation later on. The control replaces both factors with Gaussian matrices of the same
    shapes (an expected score near 0)."""
    W_E = normalize(model, embedding(model))
    circuit = full_ov_circuit(attention_weights(model, layer), W_E, unembedding(model)[0].float())
    gen = torch.Generator().manual_seed(seed)
    random = FactoredMatrix(torch.randn(circuit.A.shape, generator=gen), torch.randn(circuit.B.shape, generator=gen))
    return {"heads": copying_score(circuit).tolist(), "random_control": copying_score(random).tolist()}


def format_summary(result: Mapping[str, Any]) -> str:
    """The proxies per kind of matrix beside the control, the first directions' tokens, the copying scores."""
    cfg, control = result["config"], result["control"]
    lines = [f"{cfg['model']}: singular directions read through the unembedding (top {cfg['top_k']} tokens per "
             f"end); the control is {control['n']} random residual directions",
             f"{'matrix':<10} {'kind share':>16} {'coherence':>16}"]
    rows = [(kind, m["proxies"]) for kind, m in result["matrices"].items()] + [("random", control)]
    for kind, proxies in rows:
        lines.append(f"{kind:<10} {_mean_std(proxies['kind_share']):>16} {_mean_std(proxies['coherence']):>16}")
    for kind, matrix in result["matrices"].items():
        for entry in matrix["entries"][:2]:
            lines.append(f"\n{entry['name']}: top singular values "
                         + ", ".join(f"{s:.3g}" for s in entry["singular_values"][:6]))
            for d in entry["directions"][:10]:
                top = " ".join(repr(t) for t, _ in d["top"][:SHOWN_TOKENS])
                bottom = " ".join(repr(t) for t, _ in d["bottom"][:SHOWN_TOKENS])
                lines.append(f"  #{d['index']} {d['side']:<8} σ={d['sigma']:<8.3g} + {top}\n"
                             f"  {'':<20}  − {bottom}")
        if len(matrix["entries"]) > 2:
            lines.append(f"  ... {len(matrix['entries']) - 2} more in metrics.json")
    if "copying" in result:
        heads = ", ".join(f"H{h} {s:+.2f}" for h, s in enumerate(result["copying"]["heads"]))
        rand = result["copying"]["random_control"]
        lines.append(f"\nL{cfg['layer']} OV copying scores: {heads} "
                     f"(random circuits: {min(rand):+.2f}..{max(rand):+.2f})")
    return "\n".join(lines)


def _mean_std(stat: dict[str, float] | None) -> str:
    return "n/a" if stat is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"
