"""The figure of `interplab synth bench`: how well each architecture recovers the planted features, against L0."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from interplab.errors import InterplabError
from interplab.plotting import new_figure, num, save_figure


def synth_scores(rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """`interplab synth bench` rows: MMCS (true → learned) against L0, one panel per (generator, truth), one colour
    per architecture; dashed lines at the best random-dictionary and PCA control in the panel."""
    if not rows:
        raise InterplabError("synth_scores needs at least one bench row")
    panels: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        panels.setdefault(f"{r['generator']} / {r['ontology']}", []).append(r)
    fig, axes = new_figure(5 * len(panels), 4.2, ncols=len(panels))
    axes = np.atleast_1d(axes)
    archs = sorted({str(r["arch"]) for r in rows})
    for ax, (title, panel) in zip(axes, panels.items()):
        for i, arch in enumerate(archs):
            pts = [(num(r["l0"]), num(r["learned"]["mmcs_true"])) for r in panel if r["arch"] == arch]
            if pts:
                ax.plot(*zip(*pts), "o", color=f"C{i}", label=arch)
        for name, style in (("random", ":"), ("pca", "--")):
            ax.axhline(max(num(r[name]["mmcs_true"]) for r in panel), color="gray", ls=style, label=f"{name} control")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("L0 (active latents per sample)")
        ax.set_ylabel("MMCS, planted → learned")
        ax.set_title(title if len(title) < 60 else title[:57] + "...", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)
