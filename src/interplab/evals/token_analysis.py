"""Per-token analysis of an SAE splice: does the KL gap (SAE − ε-random) come from rare tokens?

Pure numpy functions over 1-D per-token arrays (one entry per evaluated position, BOS excluded):

    token_frequencies(ids)        count of each position's token id among ALL evaluated positions
    frequency_bins(gap, log10_f)  ~8 equal-width bins in log10 frequency (i.e. log-spaced in frequency), with the
                                  mean gap, its SEM (sample std with n − 1, over √n) and the token count per bin
    pearson(a, b)                 Pearson correlation (NaN when either side is constant or n < 2)
    per_token_analysis(...)       the summary `interplab sae eval` reports under `metrics.per_token`

Which token a position belongs to: the KL at position t compares the next-token distributions the model predicts
FROM position t, i.e. after reading input token t (its activation at the hook is the one that was replaced). So a
position is labelled with its INPUT token id `tokens[:, t]`, not with the target `tokens[:, t + 1]` (which the
clean and spliced runs are both trying to predict and which is not the token whose activation was changed).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from numpy.typing import ArrayLike

from interplab.errors import InterplabError

N_BINS = 8
"""Default number of log-spaced frequency bins."""

TOKEN_CHOICE = "input token at the predicting position (the token whose activation was replaced)"


def _1d(a: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(a).reshape(-1)
    if arr.size == 0:
        raise InterplabError(f"{name} must be non-empty")
    return arr


def token_frequencies(token_ids: ArrayLike) -> np.ndarray:
    """For each position, how many evaluated positions carry the same token id (int64, same length)."""
    ids = _1d(token_ids, "token_ids").astype(np.int64)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)]


def mean_sem(values: np.ndarray) -> tuple[float, float]:
    """(mean, sample std / √n); (NaN, NaN) for no values, SEM NaN for one value."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return math.nan, math.nan
    sem = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return float(v.mean()), sem


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson correlation coefficient of paired samples; NaN if n < 2 or either sample is constant."""
    x, y = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise InterplabError(f"pearson needs paired samples, got {x.size} and {y.size}")
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else math.nan


def bin_edges(log10_freq: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """n_bins + 1 equal-width edges in log10 frequency from its min to its max (one bin if they are equal)."""
    lo, hi = float(log10_freq.min()), float(log10_freq.max())
    if hi - lo <= 1e-12:
        return np.array([lo, hi])
    return np.linspace(lo, hi, n_bins + 1)


def frequency_bins(gap: ArrayLike, log10_freq: ArrayLike, n_bins: int = N_BINS,
                   extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Bin positions by log10 frequency; per bin the mean gap ± SEM and the counts.

    Each bin: log10_freq_lo/hi (edges; the last bin includes its upper edge), log10_freq_mean, n_tokens (positions),
    n_token_types (distinct token ids in the bin, = Σ 1/frequency over its positions, since every position of an id
    lands in the same bin), mean_gap, sem_gap, and for each array in `extra` (e.g. per-variant KL) `<name>_mean`.
    Empty bins are kept with n_tokens 0 and NaN means (None in the JSON).
    """
    g = _1d(gap, "gap").astype(np.float64)
    lf = _1d(log10_freq, "log10_freq").astype(np.float64)
    if g.shape != lf.shape:
        raise InterplabError(f"gap and log10_freq must be paired, got {g.size} and {lf.size}")
    if n_bins < 1:
        raise InterplabError(f"n_bins must be >= 1, got {n_bins}")
    edges = bin_edges(lf, n_bins)
    nb = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, lf, side="right") - 1, 0, nb - 1)  # last edge falls into the last bin
    extras = {k: _1d(v, k).astype(np.float64) for k, v in (extra or {}).items()}
    out = []
    for b in range(nb):
        sel = idx == b
        m, s = mean_sem(g[sel])
        n = int(sel.sum())
        row: dict[str, Any] = {
            "log10_freq_lo": float(edges[b]), "log10_freq_hi": float(edges[b + 1]),
            "log10_freq_mean": float(lf[sel].mean()) if n else math.nan,
            "n_tokens": n,
            # a token id of frequency f contributes f positions, so Σ 1/f over the positions counts distinct ids
            "n_token_types": int(round(float((1.0 / 10.0 ** lf[sel]).sum()))) if n else 0,
            "mean_gap": m, "sem_gap": s,
        }
        for k, v in extras.items():
            row[f"{k}_mean"] = float(v[sel].mean()) if n else math.nan
        out.append(row)
    return out


def per_token_analysis(kl_by_variant: Mapping[str, ArrayLike], token_ids: ArrayLike, n_bins: int = N_BINS,
                       a: str = "sae", b: str = "epsilon_random") -> dict[str, Any]:
    """The KL gap `a − b` per position against log10 token frequency (counted among the evaluated positions).

    Returns {token_choice, n_tokens, n_token_types, gap_mean, gap_sem, corr_gap_log10_freq, n_bins, bins}; the
    per-bin rows also give the mean KL of every variant in `kl_by_variant` as `kl_<name>_mean`.
    """
    ids = _1d(token_ids, "token_ids")
    ka, kb = _1d(kl_by_variant[a], a).astype(np.float64), _1d(kl_by_variant[b], b).astype(np.float64)
    if not (ka.size == kb.size == ids.size):
        raise InterplabError(f"per-token arrays must have one entry per token: {a} {ka.size}, {b} {kb.size}, "
                             f"token ids {ids.size}")
    gap = ka - kb
    log10_freq = np.log10(token_frequencies(ids).astype(np.float64))
    m, s = mean_sem(gap)
    return {
        "token_choice": TOKEN_CHOICE,
        "gap": f"{a} - {b}",
        "frequency": "log10 of the count of the token id among the evaluated tokens",
        "n_tokens": int(ids.size),
        "n_token_types": int(np.unique(ids).size),
        "gap_mean": m,
        "gap_sem": s,
        "corr_gap_log10_freq": pearson(gap, log10_freq),
        "n_bins": n_bins,
        "bins": frequency_bins(gap, log10_freq, n_bins,
                               extra={f"kl_{k}": v for k, v in kl_by_variant.items()}),
    }
