"""PNG figures of an `interplab weights outliers` result: outlier magnitudes per layer beside the rotated-basis
control, and the tokens carrying the massive activations.

Drawn with `interplab.plotting`: a standalone Agg figure, the PNG written atomically, the path returned.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from interplab.errors import InterplabError
from interplab.plotting import new_figure, save_figure


def _curves(result: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        return result["curves"]
    except (KeyError, TypeError) as e:
        raise InterplabError(f"not an `interplab weights outliers` result (missing {e})") from e


def magnitude_figure(result: Mapping[str, Any], path: str) -> str:
    """Left: max |act| per layer of the top dims (log y), with the largest max over the rotated coordinates and
    the layer's median |act|. Right: the same dims' mean |act| over the layer average (the rogue-dim criterion),
    with the largest such ratio in the rotated basis."""
    c = _curves(result)
    x = np.arange(len(c["layers"]))
    fig, (ax_max, ax_rogue) = new_figure(13, 4.8, ncols=2)
    for i, d in enumerate(c["dims"]):
        ax_max.plot(x, c["max_abs"][str(d)], "-o", markersize=3, color=f"C{i}", label=f"dim {d}")
        ax_rogue.plot(x, c["mean_abs_ratio"][str(d)], "-o", markersize=3, color=f"C{i}", label=f"dim {d}")
    ax_max.plot(x, c["rotated_max_abs"], "k--", linewidth=1.5, label="rotated basis: max over coords")
    ax_max.plot(x, c["median_abs"], ":", color="gray", linewidth=1.5, label="median |act| of the layer")
    ax_rogue.plot(x, c["rotated_max_mean_abs_ratio"], "k--", linewidth=1.5, label="rotated basis: largest")
    cfg = result.get("config", {})
    if cfg.get("massive_abs"):
        ax_max.axhline(cfg["massive_abs"], color="tab:red", linestyle=":", linewidth=1,
                       label=f"|act| = {cfg['massive_abs']:g}")
    if cfg.get("rogue_factor"):
        ax_rogue.axhline(cfg["rogue_factor"], color="tab:red", linestyle=":", linewidth=1,
                         label=f"rogue threshold {cfg['rogue_factor']:g}x")
    for ax, ylabel, title in ((ax_max, "max |act| over tokens", "Largest activations per layer"),
                              (ax_rogue, "mean |act| / layer average over dims", "Rogue-dimension ratio")):
        ax.set_yscale("log")
        ax.set_xticks(x, c["layers"], fontsize=7, rotation=90 if len(x) > 16 else 0)
        ax.set_xlabel("residual stream after layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def massive_tokens_figure(result: Mapping[str, Any], path: str, n_tokens: int = 15) -> str:
    """Left: the token strings carrying massive activations (distinct token positions). Right: their positions in
    the context. An empty result draws a note instead."""
    try:
        massive = result["massive"]
    except (KeyError, TypeError) as e:
        raise InterplabError(f"not an `interplab weights outliers` result (missing {e})") from e
    fig, (ax_tok, ax_pos) = new_figure(12, 4.5, ncols=2)
    if not massive["n_values"]:
        for ax in (ax_tok, ax_pos):
            ax.text(0.5, 0.5, "no massive activations", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return save_figure(fig, path)
    tokens = massive["tokens"][:n_tokens]
    ax_tok.barh(np.arange(len(tokens))[::-1], [t["count"] for t in tokens], color="tab:red")
    ax_tok.set_yticks(np.arange(len(tokens))[::-1], [repr(t["token"]) for t in tokens], fontsize=8)
    ax_tok.set_xlabel("token positions carrying a massive activation")
    ax_tok.set_title(f"Carrier tokens ({massive['n_carriers']:,} positions; {massive['share_position_0']:.0%} "
                     f"at position 0, {massive['share_delimiter']:.0%} delimiters)", fontsize=10)
    positions = sorted(massive["positions"], key=lambda p: p["position"])
    ax_pos.bar([str(p["position"]) for p in positions], [p["count"] for p in positions], color="tab:blue")
    ax_pos.set_xlabel("position in context (the 20 most frequent)")
    ax_pos.set_ylabel("carriers (log)")
    ax_pos.set_yscale("log")  # position 0 usually holds nearly all of them
    ax_pos.set_title("Positions of the carriers", fontsize=10)
    ax_pos.tick_params(axis="x", labelsize=7)
    return save_figure(fig, path)
