"""PNG figures of `interplab lens`: per-layer KL curves of the lenses, and a token × layer grid of top predictions.

Both read the dict `interplab.lens.run.run_lens` returns (and writes to OUT/metrics.json), so a saved run can be
redrawn without the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from interplab.plotting import new_figure, save_figure

KL_FLOOR = 1e-6
"""The log axis never goes below this."""


def kl_curves(result: dict[str, Any], path: str) -> str:
    """Held-out KL(final ‖ lens) per layer for the logit lens and, if present, the tuned lens (± 2 SEM), with the
    context-free controls as horizontal lines: the mean final distribution and the uniform distribution."""
    fig, ax = new_figure(7, 4.5)
    curves = {key: np.asarray(result[key]["kl"], dtype=float) for key in ("logit_lens", "tuned_lens")
              if result.get(key) and "kl" in result[key]}
    # The last layer's logit lens is the model itself (KL 0): drawn at the floor of an axis scaled to the rest,
    # rather than stretching the log axis down to rounding error.
    positive = np.concatenate([v[v > 1e-4] for v in curves.values()] + [np.array([result["baseline"]["uniform_kl"]])])
    floor = max(KL_FLOOR, 0.5 * float(positive.min()))
    for key, label, color in (("logit_lens", "logit lens", "tab:blue"), ("tuned_lens", "tuned lens", "tab:red")):
        if key not in curves:
            continue
        kl = np.maximum(curves[key], floor)
        sem = np.nan_to_num(np.asarray(result[key]["kl_sem"], dtype=float))
        layers = np.arange(len(kl))
        ax.plot(layers, kl, marker="o", markersize=3, color=color, label=label)
        ax.fill_between(layers, np.maximum(kl - 2 * sem, floor), kl + 2 * sem, color=color, alpha=0.2)
    ax.set_ylim(bottom=floor * 0.9)
    base = result["baseline"]
    ax.axhline(base["mean_distribution_kl"], color="gray", linestyle="--",
               label=f"control: mean final distribution ({base['mean_distribution_kl']:.2f})")
    ax.axhline(base["uniform_kl"], color="gray", linestyle=":", label=f"control: uniform ({base['uniform_kl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel(f"layer (residual stream after the block; KL below {floor:.2g} drawn at the bottom)")
    ax.set_ylabel("KL(final ‖ lens) [nats]")
    ax.set_title(f"{result['model']['spec']}: lens KL on {result['n_tokens']:,} held-out tokens (±2 SEM)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def prediction_grid_figure(prompt: dict[str, Any], kind: str, path: str) -> str:
    """Rows = layers (last on top), columns = prompt tokens; each cell: the lens's top next-token prediction at
    that position, coloured by its probability."""
    grid = prompt[kind]
    first = prompt.get("first_shown", 0)
    tokens = prompt["tokens"][first:]
    n_layers, n_pos = len(grid), len(tokens)
    probs = np.array([[cell[0]["prob"] for cell in row[first:]] for row in grid])     # [layer pos]
    fig, ax = new_figure(max(4.0, 0.9 * n_pos + 1.5), max(3.0, 0.28 * n_layers + 1.5))
    image = ax.imshow(probs, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for layer, row in enumerate(grid):
        for pos, cell in enumerate(row[first:]):
            p = cell[0]["prob"]
            ax.text(pos, layer, _short(cell[0]["token"]), ha="center", va="center", fontsize=6,
                    color="black" if p > 0.6 else "white")
    ax.set_xticks(range(n_pos), [_short(t) for t in tokens], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
    ax.set_xlabel("input token (the cell predicts the next one)")
    ax.set_ylabel("layer")
    ax.set_title(f"{kind.replace('_', ' ')}: top prediction per layer and position")
    fig.colorbar(image, ax=ax, label="probability of the top token")
    return save_figure(fig, path)


def _short(text: str, width: int = 8) -> str:
    """A token's text made visible (spaces as ·, newlines as ⏎) and cut to `width` characters."""
    shown = text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    shown = shown.replace("$", r"\$")  # matplotlib would read $...$ as mathtext
    return shown if len(shown) <= width else shown[: width - 1] + "…"
