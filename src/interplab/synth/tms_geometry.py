"""The geometry of a trained toy model of superposition: how many dimensions each feature gets.

For W [m, n] with column Wᵢ (feature i's direction) and Ŵᵢ = Wᵢ/‖Wᵢ‖ (Elhage et al. 2022, "Feature Dimensionality"):

    Dᵢ = ‖Wᵢ‖² / Σⱼ (Ŵᵢ · Wⱼ)²        feature dimensionality, in [0, 1]
    D* = m / ‖W‖_F²                    dimensions per feature (1/D* features per dimension)

Dᵢ is the share of a dimension feature i holds: 1 for a feature orthogonal to all others, 1/2 for each of an
antipodal pair, 2/3 for a triangle, 3/4 for a tetrahedron, 2/5 for a pentagon, 3/8 for a square antiprism. Trained
models sit on these fractions ("sticky" plateaus of D*), which `fraction_clusters` counts.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.errors import InterplabError

FRACTIONS: tuple[float, ...] = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8)
"""The dimensionalities of the uniform polytopes seen in trained toy models: orthogonal, tetrahedron, triangle,
antipodal pair, pentagon, square antiprism."""

FRACTION_NAMES: tuple[str, ...] = ("1", "3/4", "2/3", "1/2", "2/5", "3/8")

REPRESENTED_NORM = 0.5
"""A feature counts as represented when ‖Wᵢ‖ exceeds this (trained represented features have norm ≈ 1, dropped
ones ≈ 0)."""


def _check_weights(W: Tensor) -> None:
    if W.ndim < 2:
        raise InterplabError(f"W must be [..., m, n] (hidden dims × features); got shape {tuple(W.shape)}")
    if W.shape[-2] < 1:
        raise InterplabError(f"W needs n_hidden >= 1 (got shape {tuple(W.shape)})")


def require_superposition(W: Tensor, what: str) -> None:
    """Raise InterplabError unless W has more features than hidden dims (n > m), which `what` is about."""
    _check_weights(W)
    m, n = W.shape[-2:]
    if n <= m:
        raise InterplabError(f"{what} studies superposition, which needs n_features > n_hidden; got n_features={n}, "
                             f"n_hidden={m} (W [..., m, n] of shape {tuple(W.shape)})")


def feature_norms(W: Float[Tensor, "*instances m n"]) -> Float[Tensor, "*instances n"]:
    """‖Wᵢ‖ for every feature (column)."""
    _check_weights(W)
    return W.norm(dim=-2)


def represented_features(W: Float[Tensor, "*instances m n"], threshold: float = REPRESENTED_NORM) -> Tensor:
    """How many features have ‖Wᵢ‖ > threshold, per instance (an int tensor of shape `*instances`)."""
    return (feature_norms(W) > threshold).sum(-1)


def feature_dimensionality(W: Float[Tensor, "*instances m n"], eps: float = 1e-8) -> Float[Tensor, "*instances n"]:
    """Dᵢ = ‖Wᵢ‖² / Σⱼ (Ŵᵢ · Wⱼ)² for every feature; 0 for a feature with ‖Wᵢ‖ ≤ eps (it has no direction).

    The j = i term of the sum is ‖Wᵢ‖², so Dᵢ ≤ 1, with equality iff Wᵢ is orthogonal to every other column."""
    _check_weights(W)
    W = W.double()  # Σⱼ of squares over hundreds of features; exact fractions are compared at 1e-2 or finer
    norms = W.norm(dim=-2)
    unit = W / norms.clamp_min(eps).unsqueeze(-2)
    overlap = (unit.transpose(-1, -2) @ W).square().sum(-1)  # [..., n]: Σⱼ (Ŵᵢ · Wⱼ)²
    dims = norms.square() / overlap.clamp_min(eps * eps)
    return torch.where(norms > eps, dims, torch.zeros_like(dims)).float()


def dimensions_per_feature(W: Float[Tensor, "*instances m n"]) -> Float[Tensor, "*instances"]:
    """D* = m / ‖W‖_F²: with every represented feature at norm 1, hidden dims per represented feature."""
    _check_weights(W)
    return W.shape[-2] / W.double().square().sum(dim=(-2, -1)).clamp_min(1e-30).float()


def features_per_dimension(W: Float[Tensor, "*instances m n"]) -> Float[Tensor, "*instances"]:
    """‖W‖_F² / m = 1/D*: how many features the model packs into each hidden dimension."""
    _check_weights(W)
    return W.double().square().sum(dim=(-2, -1)).float() / W.shape[-2]


class FractionClusters(NamedTuple):
    fractions: tuple[float, ...]
    """The fractions looked for."""
    counts: list[int]
    """Represented features whose Dᵢ is within `tolerance` of each fraction (and nearer it than any other)."""
    represented: int
    """Features with ‖Wᵢ‖ > min_norm (the only ones counted)."""
    tolerance: float


def fraction_clusters(W: Float[Tensor, "m n"], fractions: Sequence[float] = FRACTIONS, tolerance: float = 0.01,
                      min_norm: float = REPRESENTED_NORM) -> FractionClusters:
    """Count the represented features of one instance whose dimensionality Dᵢ sits at each fraction.

    A feature is counted for the fraction nearest its Dᵢ if it is within `tolerance` of it (2/5 and 3/8 are 0.025
    apart, so keep tolerance below 0.0125 for them to stay distinct). Features with ‖Wᵢ‖ ≤ min_norm are left out:
    an unrepresented feature's Dᵢ is meaningless."""
    if W.ndim != 2:
        raise InterplabError(f"fraction_clusters takes one instance's W [m, n]; got shape {tuple(W.shape)} "
                             f"(index the instance first, e.g. result.W[k])")
    require_superposition(W, "fraction_clusters")
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise InterplabError(f"fractions must be a non-empty list of numbers in (0, 1]; got {list(fractions)}")
    if not tolerance > 0:
        raise InterplabError(f"tolerance must be > 0 (got {tolerance})")
    dims = feature_dimensionality(W)
    keep = feature_norms(W) > min_norm
    d = dims[keep]
    fr = torch.tensor(list(fractions), dtype=d.dtype)
    gap = (d.unsqueeze(-1) - fr).abs()  # [represented, fractions]
    nearest = gap.argmin(-1)
    close = gap.gather(-1, nearest.unsqueeze(-1)).squeeze(-1) <= tolerance
    counts = torch.bincount(nearest[close], minlength=len(fr)).tolist()
    return FractionClusters(fractions=tuple(fractions), counts=counts, represented=int(keep.sum()),
                            tolerance=tolerance)


def sticky_range(inverse_density: Sequence[float], d_star: Sequence[float], target: float = 0.5,
                 tolerance: float = 0.1) -> tuple[float, float, int] | None:
    """The longest run of consecutive sweep points (sorted by 1/(1 − S)) with |D* − target| ≤ tolerance.

    Returns (first 1/(1 − S), last 1/(1 − S), number of points) of that run, or None if no point qualifies."""
    pairs = sorted(zip(inverse_density, d_star))
    best: tuple[float, float, int] | None = None
    run: list[float] = []
    for x, y in pairs + [(float("inf"), float("nan"))]:  # the sentinel closes the last run
        if abs(y - target) <= tolerance:
            run.append(x)
            continue
        if run and (best is None or len(run) > best[2]):
            best = (run[0], run[-1], len(run))
        run = []
    return best
