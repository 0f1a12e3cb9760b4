"""Figures and report.md of `interplab toy inspect` (the read-outs are computed in `toy.readouts`).

Same conventions as every capability's figures: a standalone figure from `interplab.plotting`, the PNG written
atomically, the path returned. Every function reads the JSON-ready dict `run_toy_inspect` builds, so a saved
metrics.json can be drawn again.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from interplab.plotting import new_figure, save_figure

MAX_TICKS = 40
"""Axes with more token labels than this show every n-th one."""


def circuit_figures(result: Mapping[str, Any], figure: Callable[[str], str]) -> dict[str, str]:
    """The attention, eqke, evou and ablation figures of a 1-layer attention-only model's read-outs, each written to
    `figure(name)` (e.g. `Run.figure`: OUT/figures/NAME.png); returns {name: path}."""
    names, inputs = result["token_names"], result["input_tokens"]
    by_group = np.asarray(result["attention"]["by_group"], dtype=float)[:, :, inputs]  # [head group input]
    heads = [f"head {h}" for h in range(by_group.shape[0])]
    eq, ev = result["eqke"], result["evou"]
    readoff = np.asarray(eq["readoff"], dtype=float)
    full = np.asarray(eq["full"], dtype=float)
    extra = [i for i, q in enumerate(eq["queries"]) if q not in eq["keys"]]  # read-off tokens that are not inputs
    return {
        "attention": heatmaps(by_group, result["groups"], [names[t] for t in inputs], heads, figure("attention"),
                              "Attention from the read-off, by target (row) and key token (column); rows sum to 1",
                              cmap="viridis", vmin=0.0),
        "eqke": heatmaps(_centre_rows(np.concatenate([full, readoff[:, extra]], axis=1)),
                         [f"{k} ◀ read-off" if k in eq["queries"] else k for k in eq["keys"]]
                         + [f"{eq['queries'][i]} ◀ read-off" for i in extra], eq["keys"], heads, figure("eqke"),
                         "EQKE attention logits, query token at the read-off position (row) vs key token at the mean "
                         "position (column), row-centred; ◀: tokens seen at the read-off", cmap="RdBu_r"),
        "evou": heatmaps(_centre_rows(np.asarray(ev["matrix"], dtype=float)), ev["inputs"], ev["outputs"], heads,
                         figure("evou"), "EVOU: logits an attended input token (row) adds to each output "
                         "(column), row-centred over the outputs", cmap="RdBu_r"),
        "ablation": ablation_matrix(result, figure("ablation")),
    }


def heatmaps(mats: np.ndarray, rows: Sequence[str], cols: Sequence[str], titles: Sequence[str], path: str,
             suptitle: str, cmap: str = "RdBu_r", vmin: float | None = None) -> str:
    """One labelled heat map per matrix of `mats` [n, rows, cols], side by side; a diverging `cmap` is centred on 0."""
    n, n_rows, n_cols = mats.shape
    fig, axes = new_figure(min(4.5 * n, 22), 1.2 + 0.2 * max(n_rows, 8), ncols=n)
    axes = np.atleast_1d(axes)
    finite = mats[np.isfinite(mats)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    lo, hi = (vmin, top) if vmin is not None else (-top, top)
    for ax, mat, title in zip(axes, mats, titles):
        im = ax.imshow(mat, cmap=cmap, vmin=lo, vmax=hi or 1.0, aspect="auto", interpolation="nearest")
        _ticks(ax.set_yticks, ax.set_yticklabels, rows, {})
        _ticks(ax.set_xticks, ax.set_xticklabels, cols, {"rotation": 90})
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.suptitle(textwrap.fill(suptitle, 25 * n + 40), fontsize=9)
    return save_figure(fig, path)


def ablation_matrix(result: Mapping[str, Any], path: str) -> str:
    """Accuracy per group (column) for the full model and each head zero- or mean-ablated (rows)."""
    abl = result["ablation"]
    labels = ["full model"] + [f"{m}-ablate head {h}" for m in ("zero", "mean") for h in range(len(abl[m]))]
    rows = [abl["full"]] + abl["zero"] + abl["mean"]
    mat = np.array([[np.nan if a is None else a for a in r["per_group"]] for r in rows], dtype=float)
    fig, ax = new_figure(max(6.0, 0.45 * mat.shape[1] + 3), 1.2 + 0.35 * len(rows))
    ax.imshow(mat, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if mat.shape[1] <= 24:  # annotate while the numbers still fit
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.5 else "black")
    _ticks(ax.set_yticks, ax.set_yticklabels, [f"{lab} ({r['accuracy']:.2f})" for lab, r in zip(labels, rows)], {})
    _ticks(ax.set_xticks, ax.set_xticklabels, result["groups"], {"rotation": 90})
    ax.set_title("Read-off accuracy per target group (overall in brackets)", fontsize=9)
    return save_figure(fig, path)


def fourier_bars(fourier: Mapping[str, Any], path: str) -> str:
    """Share of the embedding's power per frequency k = 0..p//2, before and after the test-accuracy jump."""
    shown = [(label, fourier[label]) for label in ("before", "after") if fourier.get(label)]
    fig, ax = new_figure(max(7.0, 0.12 * (fourier["p"] // 2 + 1) + 3), 4.2)
    width = 0.8 / len(shown)
    for i, (label, row) in enumerate(shown):
        power = np.asarray(row["power"], dtype=float)
        share = power / power.sum() if power.sum() > 0 else power
        ax.bar(np.arange(len(power)) + (i - (len(shown) - 1) / 2) * width, share, width=width,
               label=f"{label}: step {row['step']}, top-{fourier['top']} share {row['top_fraction']:.2f}")
    ax.set_xlabel("frequency k (embedding DFT over the number tokens)")
    ax.set_ylabel("share of total power")
    jump = fourier.get("jump_step")
    ax.set_title(f"Fourier power of W_E (p = {fourier['p']}" + (f", test-accuracy jump at step {jump})"
                                                                 if jump is not None else ")"))
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def report_markdown(result: Mapping[str, Any], root: str) -> str:
    """A short report: task and model, accuracy, per-head summary, ablation table, Fourier view, figure links."""
    m = result["model"]
    lines = [f"# Toy inspect: {result['task']}", "",
             f"Model: {m['n_layers']} layer(s), {m['n_heads']} head(s) of d_head {m['d_head']}, d_model "
             f"{m['d_model']}, d_mlp {m['d_mlp']}, LayerNorm {m['layer_norm']}. Run: `{result['config']['run']}`.", "",
             "Accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in result["accuracy"].items())
             + f" ({result['config']['examples']} sampled sequences, seed {result['config']['seed']}).", ""]
    if result.get("circuits"):
        lines += [f"Circuit read-outs {result['circuits']}.", ""]
    if result.get("heads"):
        n_groups = len(result["groups"])
        lines += ["## Heads", "", "EVOU rows are centred over the outputs (a shift shared by every output changes no "
                  "answer).", "", "| head | attends to (mass from the read-off) | ‖EVOU‖_F | strongest EVOU entries "
                  "(input → output) | zero-ablated acc | mean-ablated acc |", "|---|---|---|---|---|---|"]
        for h in result["heads"]:
            lines.append(f"| {h['head']} | " + ", ".join(f"{t} {v:.2f}" for t, v in h["attends_to"])
                         + f" | {h['evou_norm']:.3g} | "
                         + ", ".join(f"{i} → {o} ({v:.2f})" for i, o, v in h["evou_top"])
                         + f" | {h['zero_ablated_accuracy']:.3f} | {h['mean_ablated_accuracy']:.3f} |")
        prefs = [(h["head"], h["pair_preference"]) for h in result["heads"] if h.get("pair_preference")]
        if prefs:
            lines += ["", "Pair preference (per head: signal tokens ranked by the pairs {A ≠ B} in which the read-off "
                      "attends more to them):", ""]
            lines += [f"- head {h}: " + " > ".join(f"{t} ({w:g})" for t, w in zip(p["order"], p["wins"]))
                      + ("" if p["total_order"] else " — not a fixed order") for h, p in prefs]
        abl = result["ablation"]
        lines += ["", f"## Ablation ({n_groups} target groups; failing: accuracy < 0.5; broken: failing only when "
                  "the head is ablated)", "", "| variant | accuracy | failing | broken | groups broken |",
                  "|---|---|---|---|---|", _ablation_line("full model", abl["full"])]
        lines += [_ablation_line(f"{meth}-ablate head {h}", row) for meth in ("zero", "mean")
                  for h, row in enumerate(abl[meth])]
        lines.append("")
    if result.get("fourier"):
        f = result["fourier"]
        jump = (f"Test-accuracy jump at step {f['jump_step']}; before: the last checkpoint before it"
                if f["jump_step"] is not None else "No test-accuracy jump logged; before: the first checkpoint")
        lines += ["## Fourier view of the embedding", "", f"{jump}; after: the final model.", "",
                  "| checkpoint | step | top frequencies | top-%d share |" % f["top"], "|---|---|---|---|"]
        for label in ("before", "after"):
            row = f[label]
            if row:
                lines.append(f"| {label} | {row['step']} | {row['top_frequencies']} | {row['top_fraction']:.3f} |")
        lines.append("")
    lines += ["## Figures", ""] + [f"- [{name}]({_relative(path, root)})" for name, path in result["figures"].items()]
    return "\n".join(lines) + "\n"


def _ablation_line(label: str, row: Mapping[str, Any]) -> str:
    return (f"| {label} | {row['accuracy']:.3f} | {len(row['failing'])} | {len(row['broken'])} | "
            f"{', '.join(row['broken']) or '—'} |")


def _relative(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def _centre_rows(mat: np.ndarray) -> np.ndarray:
    """Subtract each row's mean: a softmax ignores a shift shared by a whole row of logits."""
    return mat - mat.mean(-1, keepdims=True)


def _ticks(set_ticks: Any, set_labels: Any, labels: Sequence[str], kw: dict[str, Any]) -> None:
    step = max(1, -(-len(labels) // MAX_TICKS))
    idx = list(range(0, len(labels), step))
    set_ticks(idx)
    set_labels([labels[i] for i in idx], fontsize=7, **kw)
