"""Figures of `interplab weights svd`: singular value spectra, and the interpretability proxies beside the control."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from interplab.plotting import new_figure, save_figure

SPECTRUM_LENGTH = 64
"""Singular values drawn per matrix (the rest are in metrics.json)."""


def spectra(matrices: Mapping[str, Mapping[str, Any]], path: str) -> str:
    """Singular values divided by the largest, per matrix (log y); heads of one kind share a colour."""
    fig, ax = new_figure(7, 4.5)
    colours = dict(zip(matrices, [f"C{i}" for i in range(10)]))
    for kind, matrix in matrices.items():
        for i, entry in enumerate(matrix["entries"]):
            values = np.asarray(entry["singular_values"][:SPECTRUM_LENGTH], dtype=np.float64)
            if values.size and values[0] > 0:
                ax.plot(np.arange(1, len(values) + 1), values / values[0], color=colours[kind], alpha=0.7, lw=1.2,
                        label=kind if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("singular direction")
    ax.set_ylabel("σ / σ₁")
    ax.set_title("singular value spectra")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def proxy_bars(matrices: Mapping[str, Mapping[str, Any]], control: Mapping[str, Any], path: str) -> str:
    """Each proxy's mean (± sd) per kind of matrix, with the random-direction control as the last bar and a line."""
    fig, axes = new_figure(9, 4, ncols=2)
    names = [*matrices, "random"]
    summaries = [m["proxies"] for m in matrices.values()] + [control]
    for ax, proxy in zip(axes, ("kind_share", "coherence")):
        stats = [s[proxy] for s in summaries]
        means = [np.nan if s is None else s["mean"] for s in stats]
        stds = [0.0 if s is None else s["std"] for s in stats]
        ax.bar(names, means, yerr=stds, color=[*["tab:blue"] * len(matrices), "tab:gray"], capsize=3)
        if stats[-1] is not None:
            ax.axhline(stats[-1]["mean"], color="tab:gray", ls="--", lw=1)
        ax.set_title(proxy.replace("_", " ") + " of the top tokens")
        ax.tick_params(axis="x", rotation=45)
    return save_figure(fig, path)
