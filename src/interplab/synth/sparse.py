"""Sparse features in superposition: G random unit directions in d < G dimensions, a few active per sample.

The generator of Sharkey, Braun & Millidge (2022), "Taking features out of superposition with sparse autoencoders":

    features  f_i ∈ R^d, i < G                 unit-norm random directions (Gaussian, normalised; seeded)
    p_i       = min(1, c · decay^i)             c chosen so that Σ_i p_i = mean_active exactly
    active_i  ~ Bernoulli(p_i)                  independent, or correlated through a Gaussian copula (below)
    coeffs_i  = active_i · U(0, 1]                (never 0 when active, so presence = coeffs ≠ 0)
    x         = Σ_i coeffs_i f_i  (+ N(0, noise_std² I))

Clipping: when c · decay^i > 1 the first features would need a probability above 1. Because decay^i decreases, the
clipped features are a prefix i < k; they get p_i = 1 and the rest are rescaled, c = (mean_active − k) / Σ_{i≥k}
decay^i, with k the smallest index at which that rescaling no longer exceeds 1 ("water-filling").

Correlated variant (a Gaussian copula): z ~ N(0, Σ), u_i = Φ(z_i), active_i = (u_i < p_i). Each z_i is N(0, 1), so
each u_i is U[0, 1] and P(active_i) = p_i exactly — only the joint law changes. Σ is a random correlation matrix of
strength ρ = `correlation_strength` and rank r = `correlation_rank`:

    W ~ N(0, 1)^{G×r} (seeded), rows normalised to w̃_i;   Σ = ρ · W̃ W̃ᵀ + (1 − ρ) · I

so Σ_ii = 1 and Σ_ij = ρ · w̃_i·w̃_j (positive and negative correlations). It is sampled without a G×G Cholesky
factor as z = √ρ · ξ W̃ᵀ + √(1 − ρ) · ε, ξ ~ N(0, I_r), ε ~ N(0, I_G).

Streams: `batches(batch_size, start)` draws batch b from a generator seeded by (seed, b), so the stream is
deterministic and resumes at any batch index; `SyntheticSource` adapts it to the SAE trainer's source protocol.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Protocol, TypeVar

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interplab.errors import InterplabError, check_int

B = TypeVar("B")
# Keys of `derive_seed`: one independent random stream per purpose.
_FEATURES, _CORRELATION, _BATCH = 0, 1, 2


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for torch.Generator from (seed, *keys), well mixed (numpy's SeedSequence), so that nearby seeds
    and batch indices give unrelated streams."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass
class SparseFeaturesConfig:
    """Sparse features in superposition (Sharkey, Braun & Millidge 2022)."""

    n_features: int = 512
    """G: number of ground-truth features (directions)."""
    d: int = 256
    """h: dimension of the data; with G > d the features are in superposition."""
    mean_active: float = 5.0
    """Expected number of active features per sample: Σ_i p_i, exactly. In (0, n_features]."""
    decay: float = 0.99
    """p_i ∝ decay^i (before clipping at 1); 1 gives every feature the same probability. In (0, 1]."""
    correlated: bool = False
    """Correlate which features are active through a Gaussian copula; each marginal p_i is unchanged."""
    correlation_strength: float = 0.5
    """ρ in [0, 1]: Σ = ρ·W̃W̃ᵀ + (1−ρ)·I with W̃ [G, rank] random unit rows; |Σ_ij| <= ρ. Used if correlated."""
    correlation_rank: int = 8
    """r >= 1: rank of the correlated part of Σ (fewer = stronger, blockier correlations). Used if correlated."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to x (0 = none)."""
    seed: int = 0
    """Seeds the feature directions, the correlation matrix and the batch stream (a non-negative integer)."""

    def validate(self) -> None:
        """Raise an InterplabError naming the first invalid field."""
        check_int("n_features", self.n_features, 1)
        check_int("d", self.d, 1)
        check_int("seed", self.seed, 0)
        check_int("correlation_rank", self.correlation_rank, 1)
        if not 0 <= self.correlation_strength <= 1:
            raise InterplabError(f"correlation_strength must be in [0, 1], got {self.correlation_strength}")
        if not self.noise_std >= 0:
            raise InterplabError(f"noise_std must be >= 0, got {self.noise_std}")
        feature_probabilities(self.n_features, self.mean_active, self.decay)


def feature_probabilities(n_features: int, mean_active: float, decay: float) -> Float[Tensor, " G"]:
    """p_i = min(1, c·decay^i) with Σ p_i = mean_active exactly (float64); see the module docstring."""
    check_int("n_features", n_features, 1)
    if not 0 < mean_active <= n_features:
        raise InterplabError(f"mean_active must be in (0, n_features={n_features}], got {mean_active}")
    if not 0 < decay <= 1:
        raise InterplabError(f"decay must be in (0, 1], got {decay}")
    # decay^i via exp(i·log decay): it underflows to exactly 0 for steep decays, which the check below catches.
    w = torch.exp(torch.arange(n_features, dtype=torch.float64) * math.log(decay))        # [G], decreasing
    suffix = w.flip(0).cumsum(0).flip(0)                                                  # S_k = Σ_{i>=k} w_i
    k_idx = torch.arange(n_features, dtype=torch.float64)
    # The first k at which rescaling the tail to mean_active − k puts w_k at or below 1. It is consistent: k − 1
    # failing means (m − k + 1)·w_{k−1} > w_{k−1} + S_k, i.e. c_k·w_{k−1} > 1, so every clipped w_i (>= w_{k−1})
    # would indeed exceed 1, while the tail w_i <= w_k stays at or below 1.
    ok = (mean_active - k_idx) * w <= suffix
    k = int(ok.to(torch.int8).argmax()) if bool(ok.any()) else n_features
    if k >= n_features or suffix[k] <= 0:
        n_pos = int((w > 0).sum())
        raise InterplabError(f"decay={decay} is too steep for mean_active={mean_active}: decay^i underflows to 0 "
                             f"after {n_pos} of {n_features} features, so the probabilities cannot sum to "
                             f"mean_active; use a decay closer to 1")
    p = torch.ones(n_features, dtype=torch.float64)
    p[k:] = w[k:] * ((mean_active - k) / suffix[k])
    return p


class SyntheticBatch(NamedTuple):
    """A sample with its ground truth."""

    x: Float[Tensor, "n d"]
    """Data: coeffs @ features (+ noise)."""
    coeffs: Float[Tensor, "n G"]
    """True feature coefficients: U(0, 1] where active, exactly 0 elsewhere."""
    active: Bool[Tensor, "n G"]
    """Which features are active."""


class SparseFeatures:
    """The generator: fixed features and probabilities, samples on demand.

        gen = SparseFeatures(SparseFeaturesConfig(n_features=512, d=256))
        batch = gen.sample(1024, torch.Generator().manual_seed(0))     # SyntheticBatch(x, coeffs, active)
        for batch in gen.batches(4096, start=100): ...                  # deterministic, resumable stream
    """

    def __init__(self, cfg: SparseFeaturesConfig | None = None) -> None:
        cfg = cfg or SparseFeaturesConfig()
        cfg.validate()
        self.cfg = cfg
        self.d = cfg.d
        G = cfg.n_features
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, _FEATURES))
        feats = torch.randn(G, cfg.d, generator=g, dtype=torch.float64)
        self.features: Float[Tensor, "G d"] = (feats / feats.norm(dim=1, keepdim=True)).float()
        self.probs: Float[Tensor, " G"] = feature_probabilities(G, cfg.mean_active, cfg.decay)
        self._p32 = self.probs.float()
        self.factor: Float[Tensor, "G r"] | None = None
        """W̃ of the correlated variant (unit rows), else None."""
        if cfg.correlated:
            gc = torch.Generator().manual_seed(derive_seed(cfg.seed, _CORRELATION))
            W = torch.randn(G, cfg.correlation_rank, generator=gc, dtype=torch.float64)
            self.factor = (W / W.norm(dim=1, keepdim=True)).float()

    @property
    def correlation_matrix(self) -> Float[Tensor, "G G"]:
        """Σ of the copula (identity when not correlated). Builds a G×G matrix: for inspection and tests."""
        G = self.cfg.n_features
        if self.factor is None:
            return torch.eye(G)
        rho = self.cfg.correlation_strength
        return rho * (self.factor @ self.factor.T) + (1 - rho) * torch.eye(G)

    def _uniforms(self, n: int, gen: torch.Generator) -> Float[Tensor, "n G"]:
        """u with U[0, 1] marginals: independent, or Φ(z) with z ~ N(0, Σ)."""
        dev, G = gen.device, self.cfg.n_features
        if self.factor is None:
            return torch.rand(n, G, generator=gen, device=dev)
        rho = self.cfg.correlation_strength
        xi = torch.randn(n, self.cfg.correlation_rank, generator=gen, device=dev)
        eps = torch.randn(n, G, generator=gen, device=dev)
        z = math.sqrt(rho) * (xi @ self.factor.to(dev).T) + math.sqrt(1 - rho) * eps   # [n G], z_i ~ N(0, 1)
        return torch.special.ndtr(z)

    def sample(self, n: int, generator: torch.Generator) -> SyntheticBatch:
        """n samples drawn with `generator` (on its device): x [n, d], coeffs [n, G], active [n, G]."""
        check_int("n", n, 1)
        dev = generator.device
        active = self._uniforms(n, generator) < self._p32.to(dev)                          # [n G]
        # 1 − U[0, 1) is U(0, 1]: an active feature never has coefficient exactly 0.
        coeffs = (1 - torch.rand(n, self.cfg.n_features, generator=generator, device=dev)) * active
        x = coeffs @ self.features.to(dev)                                                 # [n d]
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(x.shape, generator=generator, device=dev)
        return SyntheticBatch(x, coeffs, active)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[SyntheticBatch]:
        """Batches b = start, start+1, ... endlessly; batch b is drawn with a generator seeded by (seed, b)."""
        return seeded_batches(self.sample, self.cfg.seed, batch_size, start)


def seeded_batches(
    sample: Callable[[int, torch.Generator], B], seed: int, batch_size: int, start: int = 0
) -> Iterator[B]:
    """`sample(batch_size, gen_b)` for b = start, start+1, ..., gen_b seeded by derive_seed(seed, BATCH, b)."""
    check_int("batch_size", batch_size, 1)
    check_int("start", start, 0)
    for b in itertools.count(start):
        yield sample(batch_size, torch.Generator().manual_seed(derive_seed(seed, _BATCH, b)))


class _Samples(Protocol):
    @property
    def x(self) -> Tensor: ...


class _BatchStream(Protocol):
    d: int

    def batches(self, batch_size: int, start: int = 0) -> Iterator[_Samples]:
        """Endless batches, each a NamedTuple whose field `x` holds the samples."""


class SyntheticSource:
    """A synthetic generator seen as an SAE-trainer batch source: `d_in`, `describe`, `batches(start)` of x only."""

    def __init__(self, generator: _BatchStream, batch_size: int, name: str = "synthetic") -> None:
        check_int("batch_size", batch_size, 1)
        self.generator, self.batch_size = generator, batch_size
        self.d_in = generator.d
        self.hook, self.model_spec = name, name
        self.describe = f"{name} data (d={generator.d})"

    def batches(self, start: int = 0) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Float32 batches [batch_size, d_in] from batch index `start` on, endlessly."""
        for batch in self.generator.batches(self.batch_size, start):
            yield batch.x
