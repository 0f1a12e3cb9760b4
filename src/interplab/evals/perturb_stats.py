"""Summaries of perturbation sweeps as pure tensor functions: plateau lengths and per-step curve statistics.

With KL_ij the KL of pair i at step s_j (steps increasing, s_0 = 0) and τ the threshold:

    plateau_i = min { s_j : KL_ij > τ }        (NaN when pair i never crosses: it gets no made-up value)

A kind's plateau is summarised over the crossing pairs (median, mean ± SEM) beside the fraction that never cross;
curves give, per step, the mean, SEM and percentiles over all pairs. NaN/inf become None, so the JSON stays standard.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

PERCENTILES = (10, 25, 50, 75, 90)


def _num(v: float) -> float | None:
    """NaN/inf → None, so the JSON stays standard."""
    return v if math.isfinite(v) else None


def plateau_steps(kl: Float[Tensor, "n s"], steps: Float[Tensor, " s"], threshold: float) -> Float[Tensor, " n"]:
    """Per pair, the smallest step s_j with KL_j > threshold; NaN for pairs that never cross."""
    above = kl > threshold
    first = above.int().argmax(1)                                    # first True (0 when none: masked below)
    return torch.where(above.any(1), steps.double()[first], torch.tensor(math.nan, dtype=torch.float64))


def plateau_summary(kl: Float[Tensor, "n s"], steps: Float[Tensor, " s"], threshold: float) -> dict[str, Any]:
    """Plateau length (step units): median, mean ± SEM over the pairs that cross, and the fraction that never do."""
    p = plateau_steps(kl, steps, threshold)
    crossed = p[~p.isnan()]
    k = crossed.numel()
    return {
        "threshold": threshold,
        "n_pairs": p.numel(),
        "n_crossing": k,
        "fraction_never_crossing": 1.0 - k / p.numel(),
        "median": crossed.quantile(0.5).item() if k else None,
        "mean": crossed.mean().item() if k else None,
        "sem": (crossed.std() / math.sqrt(k)).item() if k > 1 else None,
        "per_pair": [_num(v) for v in p.tolist()],
    }


def curve_summary(values: Float[Tensor, "n s"]) -> dict[str, list[float | None]]:
    """Per step, over pairs: mean, SEM (n − 1) and the 10/25/50/75/90th percentiles."""
    v = values.double()
    n = v.shape[0]
    out = {"mean": v.mean(0), "sem": v.std(0) / math.sqrt(n) if n > 1 else torch.full_like(v[0], math.nan)}
    q = torch.quantile(v, torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64), dim=0)
    out.update({f"p{p}": q[i] for i, p in enumerate(PERCENTILES)})
    return {k: [_num(x) for x in t.tolist()] for k, t in out.items()}
