"""PNG figure of an `interplab perturb` result: KL and later-layer change along the perturbation paths.

Same conventions as `report.figures`: a standalone Agg figure (matplotlib imported inside the function), the PNG
written atomically with `write_url_atomic`, the path returned.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from interplab.errors import InterplabError
from interplab.plotting import new_figure, save_figure

KL_FLOOR = 1e-6
"""KL values below this (0 at step 0, tiny negative float error) are drawn at this value on the log-y panel."""

_COLORS = {"isotropic": "tab:blue", "mean_cov": "tab:green", "real": "tab:red", "sae_decoder": "tab:purple"}
_STYLES = {"real": "-", "synthetic": "--"}


def _arr(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def perturbation_curves(result: Mapping[str, Any], path: str) -> str:
    """Two panels against the step (in units of the median ‖x‖): KL(P(x) ‖ P(x')) and the later hook's relative
    change ‖Δr‖/‖r‖. One colour per target kind; solid = real start, dashed = synthetic start; the line is the
    median over pairs and the band the 25–75% range. KL is on a log axis, clipped below at KL_FLOOR."""
    try:
        steps = np.asarray(result["steps"], dtype=np.float64)
        curves, cfg = result["curves"], result["config"]
    except (KeyError, TypeError) as e:
        raise InterplabError(f"not an `interplab perturb` result (missing {e})") from e
    if not curves:
        raise InterplabError("the perturb result has no curves to draw")
    fig, (ax_kl, ax_l2) = new_figure(12, 4.8, ncols=2)
    for i, (kind, by_start) in enumerate(curves.items()):
        color = _COLORS.get(kind, f"C{i}")
        for start, c in by_start.items():
            style = _STYLES.get(start, ":")
            for ax, stats, floor in ((ax_kl, c["kl"], KL_FLOOR), (ax_l2, c["l2_relative"], None)):
                mid, lo, hi = (_arr(stats[k]) for k in ("p50", "p25", "p75"))
                if floor is not None:
                    mid, lo, hi = (np.clip(a, floor, None) for a in (mid, lo, hi))
                ax.plot(steps, mid, style, color=color, linewidth=1.6, label=f"{kind}, {start} start")
                ax.fill_between(steps, lo, hi, color=color, alpha=0.12 if start == "real" else 0.06, linewidth=0)
    threshold = cfg.get("kl_threshold")
    if threshold:
        ax_kl.axhline(threshold, color="gray", linestyle=":", linewidth=1, label=f"threshold {threshold:g} nats")
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel(f"KL(P(x) ‖ P(x')) [nats]  (floor {KL_FLOOR:g})")
    ax_l2.set_ylabel(f"‖Δr‖ / ‖r‖,  r = {cfg.get('later_hook', 'later hook')}")
    unit = result.get("step_unit")
    for ax in (ax_kl, ax_l2):
        ax.set_xlabel("step s / median ‖x‖" + (f"  (unit = {unit:.3g})" if unit else ""))
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=7)
    ax_kl.set_title(f"Next-token KL, perturbing {cfg.get('hook', '?')} (median, 25–75%)", fontsize=10)
    ax_l2.set_title("Later-layer relative change (median, 25–75%)", fontsize=10)
    return save_figure(fig, path)
