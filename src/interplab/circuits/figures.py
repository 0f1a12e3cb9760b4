"""Figures of the circuits lab: patching heatmaps (layer × head, layer × position) with cells within noise marked,
and direct logit attribution by head and by layer."""

from __future__ import annotations

import numpy as np

from interplab.circuits.effects import Effects
from interplab.plotting import new_figure, save_figure


def effect_heatmap(effects: Effects, axes: tuple[str, ...], title: str, path: str,
                   pos_labels: list[str] | None = None) -> str:
    """Mean normalised effect per cell (diverging colours, 0 = no effect); a dot marks cells within noise.
    A 3-axis grid (layer, head, pos) is drawn as (layer·head) × pos."""
    mean, noise = effects.mean, effects.within_noise
    rows_label, cols_label = axes[0], axes[-1]
    if mean.ndim == 3:
        n_layers, n_heads = mean.shape[:2]
        mean, noise = mean.reshape(n_layers * n_heads, -1), noise.reshape(n_layers * n_heads, -1)
        rows_label = "layer.head"
    limit = float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 1.0
    fig, ax = new_figure(min(2 + 0.45 * mean.shape[1], 16), min(1.5 + 0.22 * mean.shape[0], 18))
    image = ax.imshow(mean, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    fig.colorbar(image, ax=ax, label="normalised effect (0 = corrupted, 1 = clean)")
    ys, xs = np.nonzero(noise)
    ax.scatter(xs, ys, s=4, c="0.5", marker=".", label="within noise")
    ax.set_xlabel(cols_label)
    ax.set_ylabel(rows_label)
    if cols_label == "pos" and pos_labels and len(pos_labels) == mean.shape[1]:
        ax.set_xticks(range(len(pos_labels)), pos_labels, rotation=90, fontsize=7)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def dla_figure(head_mean: np.ndarray, layer_attn: np.ndarray, layer_mlp: np.ndarray, path: str) -> str:
    """Left: each head's direct contribution to the logit difference (layer × head); right: attention (all heads
    and bias) and MLP contributions by layer."""
    fig, (left, right) = new_figure(11, 4, ncols=2)
    limit = float(np.abs(head_mean).max()) or 1.0
    image = left.imshow(head_mean, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    fig.colorbar(image, ax=left, label="logit difference")
    left.set_xlabel("head")
    left.set_ylabel("layer")
    left.set_title("direct logit attribution per head", fontsize=9)
    layers = np.arange(len(layer_attn))
    right.bar(layers - 0.2, layer_attn, 0.4, label="attention")
    if layer_mlp.size:
        right.bar(layers + 0.2, layer_mlp, 0.4, label="MLP")
    right.axhline(0, color="0.3", lw=0.5)
    right.set_xlabel("layer")
    right.set_ylabel("logit difference")
    right.legend(fontsize=8)
    right.set_title("by layer", fontsize=9)
    return save_figure(fig, path)
