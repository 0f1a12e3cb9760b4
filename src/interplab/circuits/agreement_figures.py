"""The figure that shows where attribution patching departs from activation patching: one point per node."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from interplab.circuits.agreement import Agreement
from interplab.plotting import new_figure, save_figure


def agreement_scatter(
    activation: Float[Tensor, "*shape"],
    attribution: Float[Tensor, "*shape"],
    result: Agreement,
    path: str,
    *,
    title: str = "",
    x_label: str = "activation patching (mean effect)",
    y_label: str = "attribution patching (mean effect)",
) -> str:
    """Scatter the per-node mean effects (activation on x, attribution on y) with the y = x line, label the worst
    nodes of `result`, and give Spearman, Pearson and top-k overlap in the title; write a PNG to `path`."""
    act = activation.detach().to(torch.float64).flatten().cpu().numpy()
    attr = attribution.detach().to(torch.float64).flatten().cpu().numpy()
    fig, ax = new_figure(5.5, 5.0)
    ax.scatter(act, attr, s=14, alpha=0.7, color="tab:blue", edgecolors="none")
    lo, hi = float(min(act.min(), attr.min())), float(max(act.max(), attr.max()))
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", linestyle="--", linewidth=1, label="y = x")
    for label, x, y in result.worst_nodes:
        ax.scatter([x], [y], s=30, facecolors="none", edgecolors="tab:red")
        ax.annotate(label, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, color="tab:red")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    stats = (f"Spearman {_fmt(result.spearman)}, Pearson {_fmt(result.pearson)}, "
             f"top-{result.k} overlap {result.top_k_overlap:.2f} ({result.n_nodes} nodes)")
    ax.set_title(f"{title}\n{stats}" if title else stats, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def _fmt(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"
