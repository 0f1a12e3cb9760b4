"""Figures of a decomposition: importance matrices on one-hot inputs, subcomponent-vs-true cosines, MMCS/ML2R across
seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from interplab.plotting import new_figure, num, save_figure


def importance_matrices(matrices: Mapping[str, Sequence[Sequence[float]]], path: str, title: str) -> str:
    """One heatmap per target: rows = one-hot inputs (feature i on), columns = subcomponents, ordered so that each
    feature's most important subcomponent comes first (greedily, without repeats), then the rest."""
    fig, axes = new_figure(4.0 * len(matrices), 3.2, ncols=len(matrices))
    axes = np.atleast_1d(axes)
    for ax, (name, matrix) in zip(axes, matrices.items()):
        m = np.asarray(matrix, dtype=float)
        order: list[int] = []
        for row in m:
            for c in np.argsort(-row):
                if c not in order:
                    order.append(int(c))
                    break
        order += [c for c in range(m.shape[1]) if c not in order]
        image = ax.imshow(m[:, order], vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
        ax.set_title(f"{name}", fontsize=9)
        ax.set_xlabel("subcomponent (permuted)")
        ax.set_ylabel("input feature on")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="importance")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def max_cosines(per_method: Mapping[str, Sequence[float]], path: str, title: str) -> str:
    """Each true mechanism's best cosine with a subcomponent, one series per decomposition or control."""
    fig, ax = new_figure(5.5, 3.2)
    for label, values in per_method.items():
        ax.plot(range(len(values)), [num(v) for v in values], "o-", ms=3, lw=1, label=label)
    ax.set_xlabel("true mechanism (feature)")
    ax.set_ylabel("max cosine with a subcomponent")
    ax.set_ylim(min(0.0, *(num(v) for vs in per_method.values() for v in vs)) - 0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def seed_spread(rows: Sequence[Mapping[str, float | str | None]], path: str) -> str:
    """MMCS and ML2R of every (model, method, seed) row: two panels, one point per seed."""
    fig, axes = new_figure(8.0, 3.2, ncols=2)
    labels = sorted({str(r["label"]) for r in rows})
    for ax, key, target in zip(axes, ("mmcs", "ml2r"), (1.0, 1.0)):
        for i, label in enumerate(labels):
            ys = [num(r[key]) for r in rows if r["label"] == label]  # type: ignore[arg-type]
            ax.plot([i] * len(ys), ys, "o", alpha=0.7)
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(key.upper())
    return save_figure(fig, path)
