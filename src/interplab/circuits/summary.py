"""Labels and the Markdown reports of `interplab patch` and `interplab dla` (OUT/report.md)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from interplab.fileio import write_url_atomic
from interplab.models.hooked import HookedModel
from interplab.runs import JSONDict

TOP = 10
"""Nodes listed per grid in the report."""
UNRELIABLE_GAP = (" — **the gap is within 2 SEM: the model hardly tells these prompts apart, so the normalised "
                  "effects are noise**")


def position_labels(model: HookedModel, tokens: torch.Tensor) -> list[str]:
    """`pos:token` for each position of one prompt (the position alone without a tokenizer)."""
    tok = model.tokenizer
    if tok is None or not hasattr(tok, "convert_ids_to_tokens"):
        return [str(p) for p in range(tokens.shape[0])]
    return [f"{p}:{t}" for p, t in enumerate(tok.convert_ids_to_tokens(tokens.tolist()))]


def cell_labels(axes: Sequence[str], shape: Sequence[int]) -> list[str]:
    """A label per grid cell in row-major order: L3H7, L3 pos 5, L3H7 pos 5."""
    labels = []
    for index in np.ndindex(*shape):
        named = dict(zip(axes, index))
        label = f"L{named['layer']}" + (f"H{named['head']}" if "head" in named else "")
        labels.append(label + (f" pos {named['pos']}" if "pos" in named else ""))
    return labels


def _top_rows(grid: JSONDict) -> list[str]:
    mean = np.array(grid["mean"], dtype=float)
    sem, null_mean, null_sem = (np.array(grid[k], dtype=float).ravel() for k in ("sem", "null_mean", "null_sem"))
    noise = np.array(grid["within_noise"]).ravel()
    labels = cell_labels(grid["axes"], mean.shape)
    flat = mean.ravel()
    order = np.argsort(-np.nan_to_num(np.abs(flat), nan=-1.0))[:TOP]
    return [f"| {labels[i]} | {flat[i]:+.3f} ± {sem[i]:.3f} | {null_mean[i]:+.3f} ± {null_sem[i]:.3f} | "
            f"{'within noise' if noise[i] else 'yes'} |" for i in order]


def write_patch_report(path: str, result: JSONDict) -> None:
    """report.md of a patching run: baselines, accuracy, the largest effects of each grid beside their nulls, and
    how well attribution patching agrees."""
    cfg, base = result["config"], result["baseline"]
    lines = [f"# Patching: {cfg['sweep']} sweep on {result['model']['spec']}", "",
             f"{result['n_pairs']} prompt pairs from `{cfg['prompts']}`, {result['n_pos']} tokens each; "
             f"direction **{cfg['direction']}**, metric **{cfg['metric']}**, method **{cfg['method']}**.", "",
             f"- clean metric {base['clean_mean']:.4f}, corrupted {base['corrupted_mean']:.4f} (gap {base['gap']:.4f} "
             f"± {base['gap_sem']:.4f})" + ("" if base["gap_reliable"] else UNRELIABLE_GAP),
             f"- accuracy on the prompts (answer above wrong at the last position): "
             f"{_accuracy_text(result['accuracy'])}", "",
             "Effects are normalised: 0 = the corrupted run, 1 = the clean run (mean over pairs ± SEM). The null "
             "patches the same node from another clean prompt of the same template into the clean run, so it "
             "should not move; an effect is *within noise* when |mean| < 2 SEM or |mean| < |null| + 2 null SEM.", ""]
    for name, grid in result["grids"].items():
        lines += [f"## {name}", "", f"![{name}](figures/{name}.png)", "",
                  f"{grid['n_outside_noise']} of {np.array(grid['mean']).size} nodes are outside noise.", "",
                  "| node | effect | null | outside noise |", "|---|---|---|---|", *_top_rows(grid), ""]
    for name, agreed in result.get("agreement", {}).items():
        lines += [f"## Attribution vs activation patching: {name}", "",
                  f"![agreement](figures/agreement_{name}.png)", "",
                  f"Spearman {agreed['spearman']:.3f}, Pearson {agreed['pearson']:.3f}, top-{agreed['k']} overlap "
                  f"{agreed['top_k_overlap']:.2f}, largest error {agreed['max_abs_error']:.3f} over "
                  f"{agreed['n_nodes']} nodes.", ""]
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    lines += [f"Time: {seconds}.", ""]
    write_url_atomic(path, "\n".join(lines).encode())


def _accuracy_text(accuracy: JSONDict) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in accuracy.items())
