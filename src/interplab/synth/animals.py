"""Features that do not form a basis: Lucius Bushnaq's "animals and attributes".

The same data has two exact sparse-or-dense descriptions (ontologies), and a dictionary can hold only one of them:

    attributes  e_k ∈ R^d, k < K            orthonormal (K = n_attributes, e.g. "has fur", "can fly")
    coefficients M ∈ R^{A×K}                how each animal is made of attributes (`membership`, below)
    animals     a_j = Σ_k M_jk e_k          A = n_animals directions, all inside the K-dim attribute span
    independent g_i ⊥ span(e)               n_independent random unit directions in the orthogonal complement
    data        x = Σ_j c_j a_j + Σ_i s_i g_i (+ noise)
                  = Σ_k (c M)_k e_k + Σ_i s_i g_i

Two ways to build M (`AnimalsConfig.membership`):

    dense (default)  M_j uniform on the unit sphere of R^K (a normalised Gaussian): each animal is a generic unit
                     vector of the attribute span, with attribute coefficients of order ±1/√K. Then
                     cos(a_i, a_j) = M_i·M_j and cos(a_j, e_k) = M_jk both have mean 0 and spread ≈ 1/√K, so animals
                     are nearly orthogonal to each other and to every single attribute; the attribute values c M
                     are dense (every attribute is non-zero whenever any animal is) and signed.
    binary           M ∈ {0, 1}, exactly `attributes_per_animal` ones per row, rows distinct; animals not normalised
                     (‖a_j‖ = √attributes_per_animal) so both ontologies' values share a scale; c M >= 0. The
                     earlier default, reproduced bit for bit.

Animal j is active with probability animal_mean_active / A and independent feature i with probability
independent_mean_active / n_independent (independently); active coefficients are U(0, 1], so c, s >= 0 and a
feature is present exactly where its coefficient is non-zero.

With A > K the animal directions (1000 vectors in a 50-dim span) are far from a basis: the animal ontology is the
sparse one (one active animal is one latent), the attribute one the compact one (K directions, dense values under
`dense`). `no_common_dictionary` shows numerically why no single dictionary carries both ontologies' features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.errors import InterplabError, check_int
from interplab.synth.sparse import derive_seed, seeded_batches

_DIRECTIONS, _MEMBERSHIP = 0, 1  # derive_seed keys (2 is the batch stream)
ONTOLOGIES = ("animals", "attributes")
"""The two ground truths an animals dataset carries (the independent features belong to both)."""
MEMBERSHIPS = ("dense", "binary")
"""How animals are made of attributes: generic unit vectors of the span, or sums of a few attributes."""


@dataclass
class AnimalsConfig:
    """Animals and attributes: two exact sparse descriptions of the same data."""

    n_animals: int = 1000
    """A: number of animal features."""
    n_attributes: int = 50
    """K: number of orthonormal attribute directions (at most d; below d if n_independent > 0)."""
    membership: str = "dense"
    """dense: each animal a generic unit vector of the attribute span (coefficients ~ ±1/√K); binary: each animal
    the sum of `attributes_per_animal` attributes (the earlier default)."""
    attributes_per_animal: int = 5
    """binary only: attributes each animal has (its row of M holds exactly this many ones)."""
    n_independent: int = 100
    """Independent sparse features, random unit directions orthogonal to every attribute (0 = none)."""
    d: int = 256
    """Dimension of the data."""
    animal_mean_active: float = 3.0
    """Expected number of active animals per sample (each active with probability animal_mean_active / A)."""
    independent_mean_active: float = 3.0
    """Expected number of active independent features per sample (each with probability mean / n_independent)."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to x (0 = none)."""
    seed: int = 0
    """Seeds the directions, the membership matrix and the batch stream (a non-negative integer)."""

    def validate(self) -> None:
        """Raise an InterplabError naming the first invalid field."""
        check_int("n_animals", self.n_animals, 1)
        check_int("n_attributes", self.n_attributes, 1)
        check_int("n_independent", self.n_independent, 0)
        check_int("d", self.d, 1)
        check_int("seed", self.seed, 0)
        K, k = self.n_attributes, self.attributes_per_animal
        if self.membership not in MEMBERSHIPS:
            raise InterplabError(f"membership={self.membership!r} is not one of {', '.join(MEMBERSHIPS)}")
        check_int("attributes_per_animal", k, 1)
        if self.membership == "binary" and k > K:
            raise InterplabError(f"attributes_per_animal={k} must be <= n_attributes={K}")
        if self.membership == "binary" and self.n_animals > math.comb(K, k):
            raise InterplabError(f"n_animals={self.n_animals} exceeds the {math.comb(K, k)} distinct sets of {k} of "
                                 f"{K} attributes; lower n_animals or raise n_attributes/attributes_per_animal")
        room = self.d - (1 if self.n_independent > 0 else 0)
        if K > room:
            raise InterplabError(f"n_attributes={K} must be <= d={self.d}"
                                 + (" - 1 to leave room for the independent features" if self.n_independent else ""))
        if not 0 < self.animal_mean_active <= self.n_animals:
            raise InterplabError(f"animal_mean_active must be in (0, n_animals={self.n_animals}], "
                                 f"got {self.animal_mean_active}")
        if self.n_independent and not 0 < self.independent_mean_active <= self.n_independent:
            raise InterplabError(f"independent_mean_active must be in (0, n_independent={self.n_independent}], "
                                 f"got {self.independent_mean_active}")
        if not self.noise_std >= 0:
            raise InterplabError(f"noise_std must be >= 0, got {self.noise_std}")


class AnimalsBatch(NamedTuple):
    """A sample with the ground truth of both ontologies."""

    x: Float[Tensor, "n d"]
    """Data: animal_coeffs @ animal_directions + independent_coeffs @ independent_directions (+ noise)."""
    animal_coeffs: Float[Tensor, "n A"]
    """c: U(0, 1] where an animal is active, 0 elsewhere."""
    attribute_values: Float[Tensor, "n K"]
    """c @ M: the attribute ontology's coefficients (binary: a sum of the active animals having each attribute;
    dense: signed, every attribute non-zero when any animal is active)."""
    independent_coeffs: Float[Tensor, "n I"]
    """s: U(0, 1] where an independent feature is active, 0 elsewhere."""


class Animals:
    """The generator: fixed dictionaries of both ontologies, samples on demand.

        gen = Animals(AnimalsConfig())
        batch = gen.sample(1024, torch.Generator().manual_seed(0))
        dictionary, codes = gen.truth(batch, "attributes")   # [K + I, d], [n, K + I]
    """

    def __init__(self, cfg: AnimalsConfig | None = None) -> None:
        cfg = cfg or AnimalsConfig()
        cfg.validate()
        self.cfg = cfg
        self.d = cfg.d
        K, n_ind = cfg.n_attributes, cfg.n_independent
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, _DIRECTIONS))
        # A random orthonormal basis of R^d (float64 QR): its first K columns are the attributes, the rest span
        # their orthogonal complement, where the independent features live (in superposition if n_ind > d − K).
        Q, _ = torch.linalg.qr(torch.randn(cfg.d, cfg.d, generator=g, dtype=torch.float64))
        E = Q[:, :K].T                                                                        # [K d]
        gi = torch.randn(n_ind, cfg.d - K, generator=g, dtype=torch.float64) @ Q[:, K:].T    # [I d]
        gi = gi / gi.norm(dim=1, keepdim=True).clamp_min(1e-300)
        M = _binary_membership(cfg) if cfg.membership == "binary" else _dense_membership(cfg)
        self.membership: Float[Tensor, "A K"] = M.float()
        """M: each animal's attribute coefficients (a_j = Σ_k M_jk e_k), binary or dense."""
        self.attribute_directions: Float[Tensor, "K d"] = E.float()
        self.animal_directions: Float[Tensor, "A d"] = (M @ E).float()
        self.independent_directions: Float[Tensor, "I d"] = gi.float()
        self.animal_prob = cfg.animal_mean_active / cfg.n_animals
        self.independent_prob = cfg.independent_mean_active / n_ind if n_ind else 0.0

    def sample(self, n: int, generator: torch.Generator) -> AnimalsBatch:
        """n samples drawn with `generator` (on its device)."""
        check_int("n", n, 1)
        dev, cfg = generator.device, self.cfg

        def coeffs(m: int, p: float) -> Tensor:
            active = torch.rand(n, m, generator=generator, device=dev) < p
            return (1 - torch.rand(n, m, generator=generator, device=dev)) * active  # U(0, 1]

        c = coeffs(cfg.n_animals, self.animal_prob)                                           # [n A]
        s = coeffs(cfg.n_independent, self.independent_prob)                                  # [n I]
        x = c @ self.animal_directions.to(dev) + s @ self.independent_directions.to(dev)     # [n d]
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(x.shape, generator=generator, device=dev)
        return AnimalsBatch(x, c, c @ self.membership.to(dev), s)

    def batches(self, batch_size: int, start: int = 0) -> Iterator[AnimalsBatch]:
        """Batches b = start, start+1, ... endlessly; batch b is drawn with a generator seeded by (seed, b)."""
        return seeded_batches(self.sample, self.cfg.seed, batch_size, start)

    def dictionary(self, ontology: str) -> Float[Tensor, "m d"]:
        """An ontology's true dictionary: [animal_directions; independent] or [attribute_directions; independent]."""
        own = {"animals": self.animal_directions, "attributes": self.attribute_directions}
        if ontology not in own:
            raise InterplabError(f"unknown ontology {ontology!r}; valid: {', '.join(ONTOLOGIES)}")
        return torch.cat([own[ontology], self.independent_directions])

    def truth(self, batch: AnimalsBatch, ontology: str) -> tuple[Float[Tensor, "m d"], Float[Tensor, "n m"]]:
        """(dictionary, codes) of an ontology for `batch`, rows in the same order: codes @ dictionary = x − noise."""
        own = {"animals": batch.animal_coeffs, "attributes": batch.attribute_values}
        dictionary = self.dictionary(ontology)
        return dictionary, torch.cat([own[ontology], batch.independent_coeffs], dim=1)


def _dense_membership(cfg: AnimalsConfig) -> Float[Tensor, "A K"]:
    """M [A, K] with rows uniform on the unit sphere (normalised Gaussians, float64): generic unit animals."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, _MEMBERSHIP))
    M = torch.randn(cfg.n_animals, cfg.n_attributes, generator=g, dtype=torch.float64)
    return M / M.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _binary_membership(cfg: AnimalsConfig) -> Float[Tensor, "A K"]:
    """Binary M [A, K], exactly `attributes_per_animal` ones per row, rows distinct (duplicates redrawn)."""
    A, K, k = cfg.n_animals, cfg.n_attributes, cfg.attributes_per_animal
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, _MEMBERSHIP))
    M = torch.zeros(A, K, dtype=torch.float64)
    seen: set[tuple[int, ...]] = set()
    for j in range(A):
        while True:  # validate() guarantees enough distinct sets; with A << C(K, k) a redraw is rare
            chosen = tuple(sorted(torch.randperm(K, generator=g)[:k].tolist()))
            if chosen not in seen:
                break
        seen.add(chosen)
        M[j, list(chosen)] = 1.0
    return M


class NoCommonDictionary(NamedTuple):
    """Relative reconstruction errors ‖x̂ − x‖_F / ‖x‖_F (x without noise) of candidate dictionaries."""

    animal_error: float
    """Animal ontology alone: codes [c, s], rows [a_j; g_i]. ~0 (float rounding)."""
    attribute_error: float
    """Attribute ontology alone: codes [c M, s], rows [e_k; g_i]. ~0."""
    both_error: float
    """Both ontologies' features at once — codes [c, c M, s], rows [a_j; e_k; g_i] — counts the animal part twice:
    x̂ = x + x_animal, so this equals animal_share exactly. > 0."""
    animal_share: float
    """‖x_animal‖ / ‖x‖ with x_animal = c @ animal_directions."""
    split_error: float
    """Codes [c, c M, s] with rows [½ a_j; ½ e_k; g_i]: ~0. Reconstructing with both code sets forces splitting each
    contribution, so no latent carries its feature at full strength."""
    best_decoder_error: float
    """min over every decoder D of ‖[c, c M, s] D − x‖ (least squares): ~0, because c M is a linear function of c."""


@torch.no_grad()
def no_common_dictionary(gen: Animals, n: int = 4096, seed: int = 0) -> NoCommonDictionary:
    """The numbers behind "no dictionary holds both ontologies", on n fresh samples (noise left out).

    A dictionary holds a feature when one latent has the feature's value as code AND the feature's direction (at its
    norm) as decoder row — then that latent contributes exactly the feature's term of x. Holding every feature of both
    ontologies therefore adds up x_animal = Σ_j c_j a_j = Σ_k (cM)_k e_k twice: x̂ = x + x_animal (`both_error` =
    `animal_share`), with no freedom left. Freeing the decoder does not rescue "both": the codes [c, cM, s] do
    reconstruct x (`best_decoder_error` ≈ 0, since cM is linear in c), but only by sharing each contribution
    between the two latents, e.g. rows ½ a_j and ½ e_k (`split_error` ≈ 0): then neither latent is its feature. (With
    true directions and free per-row scales μ_j, λ_k, exactness needs μ_j + λ_k = 1 on every pair with M_jk = 1, so
    full strength on one side means a zero row on the other; under `dense` every M_jk is non-zero, so every pair.)
    Each ontology alone is exact (errors ≈ 0).
    """
    check_int("n", n, 1)
    if gen.cfg.noise_std > 0:  # the same seeds without the noise (drawn last), so the same directions and codes
        gen = Animals(replace(gen.cfg, noise_std=0.0))
    b = gen.sample(n, torch.Generator().manual_seed(seed))
    c, cm, s = b.animal_coeffs.double(), b.attribute_values.double(), b.independent_coeffs.double()
    A, E, G = gen.animal_directions.double(), gen.attribute_directions.double(), gen.independent_directions.double()
    x, x_animal = b.x.double(), c @ A
    norm = x.norm().clamp_min(1e-300)

    def rel(x_hat: Tensor) -> float:
        return float((x_hat - x).norm() / norm)

    codes = torch.cat([c, cm, s], dim=1)                                                     # [n A+K+I]
    best = torch.linalg.lstsq(codes, x, driver="gelsd").solution                            # [A+K+I d]
    return NoCommonDictionary(
        animal_error=rel(c @ A + s @ G),
        attribute_error=rel(cm @ E + s @ G),
        both_error=rel(codes @ torch.cat([A, E, G])),
        animal_share=float(x_animal.norm() / norm),
        split_error=rel(codes @ torch.cat([0.5 * A, 0.5 * E, G])),
        best_decoder_error=rel(codes @ best),
    )
