"""`interplab heads`: every head's detector scores (previous-token, duplicate-token, induction, copying,
copy-suppression), each beside its shuffled and random-weights controls.

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json (every score of every head with its SEM
and both controls, and the top heads of each detector), OUT/figures/heads_<detector>.png (layer × head heatmaps of
the score beside its controls) and OUT/report.md. A complete run with the same config is reported as done.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import torch

from interplab.circuits.configs import HeadsConfig
from interplab.circuits.detector_figures import detector_heatmaps
from interplab.circuits.detectors import DETECTORS, DetectorScores, HeadDetectors, detect_heads, top_heads
from interplab.fileio import write_url_atomic
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.runs import JSONDict, Run

KIND = "heads"
"""The command, as recorded in config.json and metrics.json."""
TOP_K = 5
REPORT = "report.md"


def run_heads(cfg: HeadsConfig, *, model: HookedModel | None = None) -> JSONDict:
    """Score every head, draw the heatmaps, write report.md and OUT/metrics.json; return the metrics. A complete run
    with the same config in OUT is reported as done, not recomputed."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:
            return run.metrics
        model = model or load_model(cfg.model, device=cfg.device)
        start = time.perf_counter()
        found = detect_heads(model, n_seqs=cfg.n_seqs, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                             seed=cfg.seed)
        result: dict[str, Any] = {"config": asdict(cfg), "model": model.info.to_dict(),
                                  **detectors_json(found), "seconds": time.perf_counter() - start, "figures": {}}
        for name, scores in result["detectors"].items():
            result["figures"][name] = detector_heatmaps(name, scores, run.figure(f"heads_{name}"))
        write_url_atomic(run.path(REPORT), format_report(result).encode())
        result["report"] = run.path(REPORT)
        run.write_metrics(result)
        return {"kind": KIND, **result}


def detectors_json(found: HeadDetectors) -> dict[str, Any]:
    """Every detector as JSON: [layer][head] lists of the score, its SEM and both controls, and the top heads."""
    out: dict[str, Any] = {"n_seqs": found.n_seqs, "seq_len": found.seq_len, "detectors": {}, "skipped": {}}
    for name in DETECTORS:
        scores: DetectorScores | None = getattr(found, name)
        if scores is None:
            out["skipped"][name] = "the model has no token embedding matrix W_E (its embedding reads a table)"
            continue
        entry = {key: _grid(getattr(scores, key)) for key in DetectorScores._fields}
        entry["top"] = [_head_row(scores, layer, head) for layer, head in
                        top_heads(scores, min(TOP_K, scores.score.numel()))]
        out["detectors"][name] = entry
    return out


def _grid(values: torch.Tensor | None) -> list[list[float]] | None:
    return None if values is None else [[round(float(v), 6) for v in row] for row in values]


def _head_row(scores: DetectorScores, layer: int, head: int) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": layer, "head": head}
    for key in DetectorScores._fields:
        value = getattr(scores, key)
        row[key] = None if value is None else round(float(value[layer, head]), 6)
    return row


def _pm(value: float, sem: float | None) -> str:
    return f"{value:.3f}" if sem is None else f"{value:.3f} ± {sem:.3f}"


def format_report(result: dict[str, Any]) -> str:
    """report.md: per detector, the top heads with the score beside both controls (± SEM over sequences)."""
    model = result["model"]
    lines = [f"# Head detectors: {model['spec']}", "",
             f"{model['n_layers']} layers × {model['n_heads']} heads; pattern scores on {result['n_seqs']} "
             f"sequences [BOS, R, R] with |R| = {result['seq_len']}, averaged over the second copy (± SEM over "
             "sequences). Controls: *shuffled* = attention at a random earlier key other than the target (pattern "
             "scores) or the OV circuit with its output tokens permuted (copying); *random weights* = the same "
             "score on a freshly initialised model of the same shape.", ""]
    for name, entry in result["detectors"].items():
        lines += [f"## {name.replace('_', '-')}", "", "| head | score | shuffled | random weights |",
                  "|---|---|---|---|"]
        for row in entry["top"]:
            lines.append(f"| L{row['layer']}H{row['head']} | {_pm(row['score'], row['sem'])} | "
                         f"{_pm(row['shuffled'], row['shuffled_sem'])} | "
                         f"{_pm(row['random_weights'], row['random_weights_sem'])} |")
        lines += ["", f"![{name}](figures/heads_{name}.png)", ""]
    for name, why in result["skipped"].items():
        lines += [f"{name}: not computed ({why})", ""]
    return "\n".join(lines)


def format_summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal: the best head of each detector beside its controls."""
    lines = [f"{result['model']['spec']}: head detectors ({result['n_seqs']} sequences, |R| = {result['seq_len']})"]
    for name, entry in result["detectors"].items():
        row = entry["top"][0]
        lines.append(f"{name:>17}: L{row['layer']}H{row['head']} {row['score']:.3f} (shuffled "
                     f"{row['shuffled']:.3f}, random weights {row['random_weights']:.3f})")
    lines.append(f"report: {result['report']}")
    return "\n".join(lines)
