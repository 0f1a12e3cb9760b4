"""Figures of `interplab heads`: one layer × head heatmap per detector beside its two controls, on one colour scale."""

from __future__ import annotations

import numpy as np

from interplab.plotting import new_figure, save_figure

PANELS = (("score", "score"), ("shuffled", "control: shuffled"), ("random_weights", "control: random weights"))


def detector_heatmaps(name: str, scores: dict[str, list[list[float]]], path: str) -> str:
    """Three layer × head heatmaps (the score, the shuffled control, the random-weights control) of one detector,
    sharing one colour scale (symmetric about 0 when any value is negative), saved to `path`."""
    grids = [np.asarray(scores[key], dtype=float) for key, _ in PANELS]
    n_layers, n_heads = grids[0].shape
    low, high = min(float(g.min()) for g in grids), max(float(g.max()) for g in grids)
    if low < 0:
        high = max(abs(low), abs(high))
        low, cmap = -high, "RdBu_r"
    else:
        low, cmap = 0.0, "viridis"
    fig, axes = new_figure(3 * max(2.5, 0.35 * n_heads + 1.0), max(2.5, 0.3 * n_layers + 1.2), ncols=3)
    for ax, grid, (_, title) in zip(axes, grids, PANELS):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=low, vmax=high if high > low else low + 1)
        ax.set_title(f"{name.replace('_', '-')}: {title}", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    return save_figure(fig, path)
