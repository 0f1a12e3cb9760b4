"""Patching effects over prompt pairs: mean, standard error, and the null control beside them.

The null patches each node from another clean prompt of the same template (same answer and wrong tokens) into the
clean run: the metric should not move, so the spread of the null says how large an effect noise alone produces.
An effect is *within noise* when |mean| < 2·SEM, or |mean| < |null mean| + 2·null SEM.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Float

from interplab.runs import JSONDict


class Effects(NamedTuple):
    """One grid's normalised effects (0 = corrupted, 1 = clean), summarised over pairs."""

    mean: np.ndarray
    sem: np.ndarray
    null_mean: np.ndarray
    null_sem: np.ndarray
    within_noise: np.ndarray
    """Boolean: the effect cannot be told from noise (see the module docstring)."""

    def to_json(self, axes: tuple[str, ...]) -> JSONDict:
        return {"axes": list(axes), "mean": _rounded(self.mean), "sem": _rounded(self.sem),
                "null_mean": _rounded(self.null_mean), "null_sem": _rounded(self.null_sem),
                "within_noise": self.within_noise.tolist(), "n_outside_noise": int((~self.within_noise).sum())}


def mean_sem(values: Float[torch.Tensor, "n *cells"]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over pairs and its standard error (sample std / √n; 0 for a single pair)."""
    x = values.double().numpy()
    n = x.shape[0]
    sem = x.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(x.shape[1:])
    return x.mean(0), sem


def summarise(effect: Float[torch.Tensor, "n *cells"], null: Float[torch.Tensor, "n *cells"]) -> Effects:
    mean, sem = mean_sem(effect)
    null_mean, null_sem = mean_sem(null)
    with np.errstate(invalid="ignore"):  # NaN cells (path patching's impossible senders) count as noise
        outside = (np.abs(mean) >= 2 * sem) & (np.abs(mean) >= np.abs(null_mean) + 2 * null_sem)
    return Effects(mean, sem, null_mean, null_sem, ~outside)


def _rounded(x: np.ndarray) -> list:
    """Rounded values, NaN as None (JSON has no NaN)."""
    return np.where(np.isfinite(x), np.round(x, 6), None).tolist()
