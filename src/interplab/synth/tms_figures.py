"""PNG figures of toy models of superposition: the 2-D feature pictures and the dimensionality sweep.

Same conventions as every capability's figures: a standalone figure from `interplab.plotting`, the PNG written
atomically, the path returned.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np

from interplab.errors import InterplabError
from interplab.plotting import new_figure, save_figure
from interplab.synth.tms import TMSResult
from interplab.synth.tms_geometry import (
    FRACTION_NAMES,
    FRACTIONS,
    REPRESENTED_NORM,
    dimensions_per_feature,
    feature_dimensionality,
    feature_norms,
    represented_features,
    require_superposition,
)


def superposition_pictures(result: TMSResult, path: str) -> str:
    """One small panel per instance (sparsity) of a model with m = 2 hidden dims: each feature's column Wᵢ drawn as an
    arrow from the origin, coloured by importance (dark = most important), over the unit circle.

    Dense data shows the two most important features orthogonal; sparse data shows more than two, e.g. a pentagon."""
    W = result.W
    if W.shape[-2] != 2:
        raise InterplabError(f"superposition_pictures draws 2-D models (n_hidden = 2); this one has n_hidden = "
                             f"{W.shape[-2]} — use dimensionality_sweep for larger models")
    require_superposition(W, "superposition_pictures")
    cfg = result.config
    k = W.shape[0]
    fig, axes = new_figure(2.2 * k, 2.6, ncols=k)
    axes = np.atleast_1d(axes)
    imp = cfg.importance().numpy()
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(imp)))  # importance decays with i
    lim = max(1.2, float(feature_norms(W).max()) * 1.1)
    circle = np.linspace(0, 2 * math.pi, 200)
    for ax, w, s, n_rep in zip(axes, W.numpy(), cfg.sparsities, represented_features(W).tolist()):
        ax.plot(np.cos(circle), np.sin(circle), color="lightgray", linewidth=0.8)
        for i in range(w.shape[1]):
            ax.annotate("", xy=(w[0, i], w[1, i]), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="-|>", color=colors[i], linewidth=1.5))
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"S = {s:.3g}\n{n_rep} of {w.shape[1]} features", fontsize=9)
    fig.suptitle(f"Columns Wᵢ of {k} toy models (n = {W.shape[-1]}, m = 2; colour: importance "
                 f"{cfg.importance_decay:g}^i, dark = first)", fontsize=9)
    return save_figure(fig, path)


def dimensionality_sweep(result: TMSResult, path: str, min_norm: float = REPRESENTED_NORM) -> str:
    """D* = m/‖W‖_F² (dimensions per feature) against 1/(1 − S) on a log axis, with each represented feature's Dᵢ as
    a dot at its instance's sparsity and dashed reference lines at the fractions 1, 3/4, 2/3, 1/2, 2/5, 3/8."""
    W = result.W
    require_superposition(W, "dimensionality_sweep")
    x = 1.0 / (1.0 - np.asarray(result.config.sparsities, dtype=np.float64))
    d_star = dimensions_per_feature(W).numpy()
    dims = feature_dimensionality(W).numpy()
    keep = feature_norms(W).numpy() > min_norm
    fig, ax = new_figure(8, 4.8)
    for f, name in zip(FRACTIONS, FRACTION_NAMES):
        ax.axhline(f, color="gray", linestyle="--", linewidth=0.7)
        ax.annotate(name, (1.0, f), xycoords=("axes fraction", "data"), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8, color="gray")
    xs = np.repeat(x[:, None], dims.shape[1], axis=1)[keep]
    jitter = np.exp(np.random.default_rng(0).uniform(-0.03, 0.03, xs.shape))  # spread dots stacked at one x
    ax.scatter(xs * jitter, dims[keep], s=4, alpha=0.25, color="tab:blue", linewidths=0,
               label=f"Dᵢ of each feature with ‖Wᵢ‖ > {min_norm:g}")
    order = np.argsort(x)
    ax.plot(x[order], d_star[order], "o-", color="black", markersize=3, label="D* = m / ‖W‖²_F")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("1 / (1 − S)   (samples per appearance of a feature)")
    ax.set_ylabel("dimensions per feature")
    n, m = W.shape[-1], W.shape[-2]
    ax.set_title(f"Feature dimensionality across sparsity (n = {n}, m = {m})")
    ax.legend(fontsize=8, loc="lower left")
    return save_figure(fig, path)
