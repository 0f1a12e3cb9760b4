"""PNG figures of an SAE evaluation: KL histograms, KL gap vs token frequency, and an L0 Pareto plot across SAEs.

Each function draws on a standalone `matplotlib.figure.Figure` with the Agg canvas (no pyplot, so no global state
and no display needed), renders the PNG into memory and writes it with `write_url_atomic` (local path or fsspec URL;
the file is either absent/old or complete). Each returns the path it wrote.
"""

from __future__ import annotations

import math
import posixpath
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.ticker import NullFormatter, ScalarFormatter

from interplab.errors import InterplabError
from interplab.fileio import open_url
from interplab.plotting import new_figure, num, save_figure
from interplab.runs import read_json_object

KL_FLOOR = 1e-8
"""KL values below this (0 for an untouched token, or tiny negative float error) are drawn at this value on the
log-x histograms; the legend says how many."""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_COLORS = {"sae": "tab:red", "epsilon_random": "tab:blue", "sae_norm_patch": "tab:green"}
_LABELS = {"sae": "SAE", "epsilon_random": "ε-random", "sae_norm_patch": "SAE-norm patch"}


def kl_histograms(kl_by_variant: Mapping[str, np.ndarray], path: str, bins: int = 60) -> str:
    """Overlaid log-x histograms of per-token KL(clean ‖ variant), one per variant (SAE, ε-random, SAE-norm patch...),
    with each variant's mean as a dashed line. Values below KL_FLOOR are drawn at KL_FLOOR."""
    fig, ax = new_figure(7, 4.5)
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in kl_by_variant.items()}
    arrays = {k: v[np.isfinite(v)] for k, v in arrays.items() if v.size}
    top = max((float(v.max()) for v in arrays.values() if v.size), default=0.0)
    if top <= KL_FLOOR:
        ax.text(0.5, 0.5, "all KL values are 0 (below %.0e)" % KL_FLOOR, ha="center", va="center",
                transform=ax.transAxes)
        edges = np.logspace(math.log10(KL_FLOOR), 0, bins + 1)
    else:
        positive = np.concatenate([v[v > KL_FLOOR] for v in arrays.values()])
        lo = max(KL_FLOOR, float(np.quantile(positive, 0.001)) / 2)
        edges = np.logspace(math.log10(lo), math.log10(top * 1.05), bins + 1)
        for name, v in arrays.items():
            n_low = int((v < edges[0]).sum())
            label = f"{_LABELS.get(name, name)} (mean {v.mean():.3g}, n={v.size:,}"
            label += f", {n_low:,} below {edges[0]:.1e})" if n_low else ")"
            color = _COLORS.get(name)
            ax.hist(np.clip(v, edges[0], None), bins=edges, histtype="step", linewidth=1.5, color=color, label=label)
            ax.axvline(max(v.mean(), edges[0]), color=color, linestyle="--", linewidth=1)
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("KL(clean ‖ spliced) per token [nats]")
    ax.set_ylabel("tokens")
    ax.set_title("Per-token KL of the SAE splice and its controls")
    return save_figure(fig, path)


def kl_gap_vs_frequency(bins: Sequence[Mapping[str, Any]], path: str, corr: float | None = None) -> str:
    """Mean KL gap (SAE − ε-random) ± SEM per log10-frequency bin (the rows of `metrics.per_token.bins`); empty bins
    are skipped, a bin with one token is drawn without an error bar. Token counts are written above the points."""
    fig, ax = new_figure(7, 4.5)
    rows = [b for b in bins if b.get("n_tokens") and b.get("mean_gap") is not None
            and math.isfinite(num(b["mean_gap"]))]
    if not rows:
        ax.text(0.5, 0.5, "no tokens", ha="center", va="center", transform=ax.transAxes)
    else:
        x = np.array([num(b.get("log10_freq_mean", None)) if b.get("log10_freq_mean") is not None
                      else (num(b["log10_freq_lo"]) + num(b["log10_freq_hi"])) / 2 for b in rows])
        y = np.array([num(b["mean_gap"]) for b in rows])
        e = np.nan_to_num(np.array([num(b.get("sem_gap")) for b in rows]), nan=0.0)
        ax.errorbar(x, y, yerr=e, fmt="o-", capsize=4, color="tab:purple", label="mean gap ± SEM")
        for xi, yi, b in zip(x, y, rows):
            ax.annotate(f"n={b['n_tokens']:,}", (xi, yi), textcoords="offset points", xytext=(0, 8), ha="center",
                        fontsize=7)
        ax.legend(fontsize=8)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("log10 token frequency (count among evaluated tokens)")
    ax.set_ylabel("KL(SAE) − KL(ε-random) [nats]")
    title = "KL gap vs token frequency"
    if corr is not None and math.isfinite(corr):
        title += f"  (Pearson r = {corr:.3f})"
    ax.set_title(title)
    return save_figure(fig, path)


def pareto(points: Sequence[Mapping[str, Any]], path: str) -> str:
    """Two panels, one labelled point per SAE: L0 vs FVU, and L0 vs CE-loss-recovered.

    Each point: {"label", "l0", "fvu", "ce_loss_score"} and optionally "fvu_typical" (FVU without massive-norm
    tokens, drawn hollow beside the all-token FVU: a handful of such tokens can decide the all-token figure). A
    missing/None value leaves the point out of that panel."""
    if not points:
        raise InterplabError("pareto needs at least one point")
    fig, (a1, a2) = new_figure(11, 4.5, ncols=2)
    for ax, key, ylabel in ((a1, "fvu", "FVU (fraction of variance unexplained)"),
                            (a2, "ce_loss_score", "CE loss recovered")):
        pts = sorted(((num(p.get("l0")), num(p.get(key)), num(p.get("fvu_typical")), str(p.get("label", i)))
                      for i, p in enumerate(points)), key=lambda p: p[0])
        shown = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
        if shown:
            ax.plot([p[0] for p in shown], [p[1] for p in shown], "o", color="tab:blue",
                    label="all tokens" if key == "fvu" else None)
            for x, y, _, label in shown:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        typical = [p for p in pts if key == "fvu" and math.isfinite(p[0]) and math.isfinite(p[2])]
        if typical:
            ax.plot([p[0] for p in typical], [p[2] for p in typical], "o", mfc="none", color="tab:orange",
                    label="without massive-norm tokens")
            ax.legend(fontsize=8)
        if shown and min(p[0] for p in shown) > 0:
            ax.set_xscale("log")
            ax.set_xticks(sorted({p[0] for p in shown}))  # a sweep rarely spans a decade: tick the SAEs' own L0s
            ax.xaxis.set_major_formatter(ScalarFormatter())  # 16, 64 rather than 1.6×10¹
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    a1.set_title("Sparsity vs reconstruction")
    a2.set_title("Sparsity vs downstream loss")
    return save_figure(fig, path)


def sae_label(result: Mapping[str, Any]) -> str:
    """An evaluation result's SAE, by its folder's name."""
    sae = (result.get("config") or {}).get("sae") or ""
    return posixpath.basename(str(sae).rstrip("/")) or "sae"


def point_from_metrics(result: Mapping[str, Any], label: str | None = None) -> dict[str, Any]:
    """The Pareto point of one `interplab sae eval` result dict (label: the SAE folder's name by default)."""
    try:
        m = result["metrics"]
        point = {"label": label or sae_label(result),
                 "l0": m["sparsity"]["l0"], "fvu": m["reconstruction"]["fvu"],
                 "ce_loss_score": m["model_performance"]["ce_loss_score"],
                 "fvu_typical": (m.get("reconstruction_typical") or {}).get("fvu")}
    except (KeyError, TypeError, AttributeError) as e:
        raise InterplabError(f"not an `interplab sae eval` metrics file (missing {e})") from None
    for key in ("l0", "fvu", "ce_loss_score", "fvu_typical"):  # None (a NaN written as null) leaves a gap
        value = point[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InterplabError(f"not an `interplab sae eval` metrics file ({key} is {value!r}, not a number)")
    return point


def check_png_out(out: str) -> None:
    """Refuse a figure path that is a folder, sits under a file, or is a file other than a PNG (a PNG is replaced)."""
    fs, path = open_url(out)
    if fs.exists(path):
        if fs.isdir(path):
            raise InterplabError(f"--out {out} is a folder; --out names the PNG file to write")
        with fs.open(path, "rb") as f:
            if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
                raise InterplabError(f"--out {out} exists and is not a PNG; choose a new file or delete it")
        return
    parent = posixpath.dirname(path.rstrip("/"))
    while parent and not fs.exists(parent) and posixpath.dirname(parent) != parent:
        parent = posixpath.dirname(parent)
    if parent and fs.exists(parent) and not fs.isdir(parent):
        raise InterplabError(f"--out {out}: {parent} is a file, not a folder")


def pareto_from_metrics(paths: Sequence[str], out_png: str) -> str:
    """Read several metrics.json files written by `interplab sae eval --out` and draw their Pareto plot. Every file
    is read and checked, and `out_png` too, before anything is drawn: a bad one is one `InterplabError`."""
    check_png_out(out_png)
    points = []
    for p in paths:
        fs, path = open_url(p)
        if not fs.exists(path):
            raise InterplabError(f"{p} does not exist")
        result = read_json_object(p)  # not UTF-8, not JSON, not an object: one line naming the file
        try:
            points.append(point_from_metrics(result))
        except InterplabError as e:
            raise InterplabError(f"{p}: {e}") from None
    return pareto(points, out_png)
