"""How well attribution patching reproduces activation patching on the same nodes: rank and linear correlation,
overlap of the top-k nodes, and where the approximation fails worst.

Computed on the mean effect of each node over pairs (pass `effects.mean(0)` of each method's `[n, *grid]` output,
both normalised the same way).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from interplab.errors import InterplabError


class Agreement(NamedTuple):
    spearman: float
    """Spearman rank correlation over nodes (NaN when either method gives every node the same value)."""
    pearson: float
    """Pearson correlation over nodes (NaN likewise)."""
    top_k_overlap: float
    """|top-k by |activation| ∩ top-k by |attribution|| / k: do both methods name the same most important nodes?"""
    k: int
    """The k used (at most the number of nodes)."""
    n_nodes: int
    max_abs_error: float
    """max over nodes of |attribution − activation|."""
    worst_nodes: list[tuple[str, float, float]]
    """The nodes with the largest |attribution − activation|, largest first: (label, activation, attribution)."""


def agreement(
    activation: Float[Tensor, "*shape"],
    attribution: Float[Tensor, "*shape"],
    labels: list[str],
    k: int = 10,
    *,
    n_worst: int = 5,
) -> Agreement:
    """Compare per-node mean effects of activation patching (the truth) and attribution patching (the estimate).

    Spearman ρ = Pearson correlation of the ranks (ties get their mean rank), by scipy.stats; top-k overlap ranks
    nodes by absolute effect (ties broken by node order), since a large negative effect matters as much as a
    positive one. `labels` name the nodes in the order of the flattened arrays.
    """
    act, attr = _check(activation, attribution, labels, k, n_worst)
    k = min(k, act.size)
    with warnings.catch_warnings():  # a constant input gives NaN, which is the honest answer; no warning needed
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        spearman = float(stats.spearmanr(act, attr).statistic)
        pearson = float(stats.pearsonr(act, attr).statistic)
    top_act, top_attr = _top_k(act, k), _top_k(attr, k)
    error = np.abs(attr - act)
    worst = np.argsort(-error, kind="stable")[: min(n_worst, act.size)]
    return Agreement(
        spearman=spearman, pearson=pearson, top_k_overlap=len(top_act & top_attr) / k, k=k, n_nodes=act.size,
        max_abs_error=float(error.max()),
        worst_nodes=[(labels[i], float(act[i]), float(attr[i])) for i in worst],
    )


def _top_k(values: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-np.abs(values), kind="stable")[:k].tolist())


def _check(activation: Tensor, attribution: Tensor, labels: list[str], k: int,
           n_worst: int) -> tuple[np.ndarray, np.ndarray]:
    if activation.shape != attribution.shape:
        raise InterplabError(f"activation and attribution effects must have the same shape, got "
                             f"{tuple(activation.shape)} and {tuple(attribution.shape)}")
    if activation.numel() != len(labels):
        raise InterplabError(f"{len(labels)} labels for {activation.numel()} nodes: pass one label per node and the "
                             "mean effect over pairs (effects.mean(0)), not per-pair effects")
    if activation.numel() < 2:
        raise InterplabError(f"agreement needs at least 2 nodes, got {activation.numel()}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or n_worst < 0:
        raise InterplabError(f"k must be an integer >= 1 and n_worst >= 0, got k={k!r}, n_worst={n_worst!r}")
    act = activation.detach().to(torch.float64).flatten().cpu().numpy()
    attr = attribution.detach().to(torch.float64).flatten().cpu().numpy()
    if not (np.isfinite(act).all() and np.isfinite(attr).all()):
        raise InterplabError("activation and attribution effects must be finite (no NaN or inf)")
    return act, attr
