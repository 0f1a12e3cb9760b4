"""Score a learned dictionary against planted ground-truth features, beside a random and a PCA control.

With learned decoder rows d_j (j < m) and true features f_i (i < G), cos_ij = ⟨f_i, d_j⟩ / (‖f_i‖ ‖d_j‖):

    mmcs_true       = mean_i max_j cos_ij          how well each true feature is found (Sharkey et al. 2022's MMCS)
    mmcs_learned    = mean_j max_i cos_ij          how many learned rows are some true feature
    recovery        = #{i : max_j cos_ij >= threshold} / G
    matching        one-to-one pairs (i, π(i)) maximising Σ_i cos_{i π(i)} (Hungarian, scipy linear_sum_assignment)
    matched_cosine  = mean over pairs of cos_{i π(i)};  matched_recovery = #{pairs with cos >= threshold} / G

Signed cosines: a learned row pointing away from a feature (cos −1) has not found it, since codes are >= 0.
Given codes [n, m] and true coefficients [n, G] on the same n samples, on each matched pair:

    f1           = 2·TP / (#fired + #present),  fired = code_{π(i)} ≠ 0, present = coeff_i ≠ 0    (1 if both never)
    correlation  = Pearson(code_{π(i)}, coeff_i) over the samples                      (0 if either is constant)

Controls, scored the same way (`score_with_controls`): a random dictionary of the same size (seeded Gaussian rows,
unit norm) and the top min(m, d) principal directions of the data, each sign-flipped so that the mean of the data
projects positively on it (PCA's sign is arbitrary, and the features' coefficients are non-negative). A control's
codes are those of a tied linear encoder, relu(x @ Dᵀ): what the geometry alone gives without a learned encoder.

MMCS and recovery read the cosine matrix a block of rows at a time, so G and m of ~16k fit in memory; the Hungarian
matching needs the dense G×m matrix (scipy holds it in float64: 8·G·m bytes, 2 GB at 16k×16k).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from interplab.errors import InterplabError, check_int
from interplab.sae.base import SparseAutoencoder

BLOCK_ELEMENTS = 1 << 24
"""Cosine-matrix entries computed at once (64 MB in float32)."""
MAX_MATCH_ELEMENTS = 1 << 28
"""Largest G·m the Hungarian matching accepts (a dense float64 matrix of 2 GB)."""


def _unit(W: Tensor) -> Tensor:
    """Rows scaled to unit norm in float32; zero rows stay zero (cosine 0 with everything)."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _check_dicts(learned: Tensor, true: Tensor) -> None:
    if learned.ndim != 2 or true.ndim != 2 or learned.shape[1] != true.shape[1] or 0 in learned.shape + true.shape:
        raise InterplabError(f"learned and true dictionaries must be non-empty [rows, d] with the same d, got "
                             f"{tuple(learned.shape)} and {tuple(true.shape)}")


class MaxCosine(NamedTuple):
    """Best cosine each way between two dictionaries."""

    true_max: Float[Tensor, " G"]
    """max_j cos_ij: each true feature's best learned row."""
    true_arg: Int[Tensor, " G"]
    """The j attaining it."""
    learned_max: Float[Tensor, " m"]
    """max_i cos_ij: each learned row's best true feature."""
    learned_arg: Int[Tensor, " m"]
    """The i attaining it."""


@torch.no_grad()
def max_cosines(learned: Float[Tensor, "m d"], true: Float[Tensor, "G d"],
                block_elements: int = BLOCK_ELEMENTS) -> MaxCosine:
    """Both row-wise maxima of the cosine matrix, computed in blocks of true rows (never all G×m at once)."""
    _check_dicts(learned, true)
    L, T = _unit(learned), _unit(true.to(learned.device))
    rows = max(1, block_elements // L.shape[0])
    t_max, t_arg, l_max, l_arg = [], [], None, None
    for s in range(0, T.shape[0], rows):
        cos = T[s:s + rows] @ L.T                                                     # [rows m]
        v, a = cos.max(dim=1)
        t_max.append(v)
        t_arg.append(a)
        bv, ba = cos.max(dim=0)
        if l_max is None:
            l_max, l_arg = bv, ba + s
        else:
            better = bv > l_max  # ties keep the earlier block, as a full argmax would
            l_max, l_arg = torch.where(better, bv, l_max), torch.where(better, ba + s, l_arg)
    return MaxCosine(torch.cat(t_max), torch.cat(t_arg), l_max, l_arg)


def mmcs(learned: Float[Tensor, "m d"], true: Float[Tensor, "G d"]) -> tuple[float, float]:
    """(mean over true features of the max cosine with a learned row, mean over learned rows of the max with a true)."""
    mc = max_cosines(learned, true)
    return float(mc.true_max.mean()), float(mc.learned_max.mean())


def recovery_rate(learned: Float[Tensor, "m d"], true: Float[Tensor, "G d"], threshold: float = 0.9) -> float:
    """Fraction of true features with some learned row at cosine >= threshold."""
    return float((max_cosines(learned, true).true_max >= threshold).float().mean())


class Matching(NamedTuple):
    """A one-to-one matching of min(G, m) pairs maximising the total cosine, sorted by true index."""

    true_idx: Int[Tensor, " P"]
    learned_idx: Int[Tensor, " P"]
    cosine: Float[Tensor, " P"]


@torch.no_grad()
def hungarian_match(learned: Float[Tensor, "m d"], true: Float[Tensor, "G d"]) -> Matching:
    """argmax over one-to-one pairings of Σ cos (scipy's linear_sum_assignment on the dense cosine matrix)."""
    _check_dicts(learned, true)
    if learned.shape[0] * true.shape[0] > MAX_MATCH_ELEMENTS:
        raise InterplabError(f"Hungarian matching of {true.shape[0]} true features to {learned.shape[0]} rows needs "
                             f"a dense {true.shape[0]}x{learned.shape[0]} matrix; at most {MAX_MATCH_ELEMENTS} "
                             "entries are supported")
    cos = (_unit(true.to(learned.device)) @ _unit(learned).T).cpu()                    # [G m]
    rows, cols = linear_sum_assignment(cos.double().numpy(), maximize=True)
    ti, li = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    return Matching(ti, li, cos[ti, li])


class PairScores(NamedTuple):
    """Per matched pair: how well the learned latent tracks its true feature on a sample."""

    f1: Float[Tensor, " P"]
    """F1 of latent firing (code ≠ 0) against feature presence (coefficient ≠ 0)."""
    correlation: Float[Tensor, " P"]
    """Pearson correlation of the latent's code with the feature's coefficient."""


@torch.no_grad()
def pair_scores(codes: Float[Tensor, "n m"], coeffs: Float[Tensor, "n G"], matching: Matching,
                block: int = 1024) -> PairScores:
    """F1 and correlation of codes[:, learned_idx] against coeffs[:, true_idx], a block of pairs at a time."""
    if codes.ndim != 2 or coeffs.ndim != 2 or codes.shape[0] != coeffs.shape[0] or codes.shape[0] < 1:
        raise InterplabError(f"codes [n, m] and coeffs [n, G] must cover the same n >= 1 samples, got "
                             f"{tuple(codes.shape)} and {tuple(coeffs.shape)}")
    f1s, corrs = [], []
    for s in range(0, len(matching.true_idx), block):
        z = codes[:, matching.learned_idx[s:s + block].to(codes.device)].double()      # [n P]
        t = coeffs[:, matching.true_idx[s:s + block].to(coeffs.device)].to(z)          # [n P]
        fired, present = z != 0, t != 0
        tp = (fired & present).sum(0).double()
        denom = (fired.sum(0) + present.sum(0)).double()
        f1s.append(torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.ones_like(tp)))
        zc, tc = z - z.mean(0), t - t.mean(0)
        sz, st = zc.norm(dim=0), tc.norm(dim=0)
        ok = (sz > 1e-12 * z.abs().amax(0).clamp_min(1)) & (st > 1e-12 * t.abs().amax(0).clamp_min(1))
        r = (zc * tc).sum(0) / (sz * st).clamp_min(1e-300)
        corrs.append(torch.where(ok, r, torch.zeros_like(r)))
    return PairScores(torch.cat(f1s).float(), torch.cat(corrs).float())


def random_dictionary(n_rows: int, d: int, seed: int = 0) -> Float[Tensor, "m d"]:
    """n_rows Gaussian rows normalised to unit norm, from a generator seeded by `seed`."""
    check_int("n_rows", n_rows, 1)
    check_int("d", d, 1)
    return _unit(torch.randn(n_rows, d, generator=torch.Generator().manual_seed(seed)))


@torch.no_grad()
def pca_directions(x: Float[Tensor, "n d"], k: int) -> Float[Tensor, "k d"]:
    """The top-k principal directions of x (centred; SVD in float64), oriented so that mean(x) · v >= 0.

    At most min(n, d) directions exist; asking for more returns that many.
    """
    check_int("k", k, 1)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InterplabError(f"PCA needs data [n >= 2, d], got {tuple(x.shape)}")
    x = x.detach().double()
    _, _, Vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)                   # [min(n,d) d]
    V = Vh[:k]
    sign = torch.where(V @ x.mean(0) < 0, -1.0, 1.0).to(V)
    return (V * sign[:, None]).float()


def score_dictionary(W_dec: Float[Tensor, "m d"], true_features: Float[Tensor, "G d"], *,
                     codes: Float[Tensor, "n m"] | None = None, coeffs: Float[Tensor, "n G"] | None = None,
                     threshold: float = 0.9) -> dict[str, Any]:
    """Every score of the module docstring as plain floats/ints (JSON-able); f1 and correlation need both codes and
    coeffs (on the same samples) and are means over the matched pairs."""
    if (codes is None) != (coeffs is None):
        raise InterplabError("pass both codes and coeffs (on the same samples), or neither")
    if not -1 <= threshold <= 1:
        raise InterplabError(f"threshold is a cosine, it must be in [-1, 1], got {threshold}")
    mc = max_cosines(W_dec, true_features)
    match = hungarian_match(W_dec, true_features)
    G = true_features.shape[0]
    out: dict[str, Any] = {
        "n_true": G,
        "n_learned": int(W_dec.shape[0]),
        "threshold": float(threshold),
        "mmcs_true": float(mc.true_max.mean()),
        "mmcs_learned": float(mc.learned_max.mean()),
        "recovery": float((mc.true_max >= threshold).sum()) / G,
        "matched_cosine": float(match.cosine.mean()),
        "matched_recovery": float((match.cosine >= threshold).sum()) / G,
    }
    if codes is not None and coeffs is not None:
        if codes.shape[1] != W_dec.shape[0] or coeffs.shape[1] != G:
            raise InterplabError(f"codes must be [n, {W_dec.shape[0]}] and coeffs [n, {G}], got "
                                 f"{tuple(codes.shape)} and {tuple(coeffs.shape)}")
        ps = pair_scores(codes, coeffs, match)
        out["f1"], out["correlation"] = float(ps.f1.mean()), float(ps.correlation.mean())
    return out


def score_with_controls(W_dec: Float[Tensor, "m d"], true_features: Float[Tensor, "G d"],
                        x: Float[Tensor, "n d"], *, codes: Float[Tensor, "n m"] | None = None,
                        coeffs: Float[Tensor, "n G"] | None = None, threshold: float = 0.9,
                        seed: int = 0) -> dict[str, dict[str, Any]]:
    """{"learned": ..., "random": ..., "pca": ...}: the learned dictionary's scores beside its two controls.

    `x` is the data the PCA control is fitted on; when codes and coeffs are given they must be on these samples,
    and the controls' codes are relu(x @ Dᵀ).
    """
    W_dec = W_dec.detach()
    if x.ndim != 2 or x.shape[1] != W_dec.shape[1]:
        raise InterplabError(f"x must be [n, {W_dec.shape[1]}], got {tuple(x.shape)}")
    if coeffs is not None and coeffs.shape[0] != x.shape[0]:
        raise InterplabError(f"coeffs must be on the samples of x ({x.shape[0]}), got {coeffs.shape[0]} rows")
    out = {"learned": score_dictionary(W_dec, true_features, codes=codes, coeffs=coeffs, threshold=threshold)}
    controls = {"random": random_dictionary(W_dec.shape[0], W_dec.shape[1], seed),
                "pca": pca_directions(x, min(W_dec.shape[0], W_dec.shape[1]))}
    for name, D in controls.items():
        D = D.to(x.device)
        ctrl_codes = torch.relu(x.float() @ D.T) if coeffs is not None else None
        out[name] = score_dictionary(D, true_features, codes=ctrl_codes, coeffs=coeffs, threshold=threshold)
    return out


@torch.no_grad()
def score_sae(sae: SparseAutoencoder, true_features: Float[Tensor, "G d"], x: Float[Tensor, "n d"] | None = None,
              coeffs: Float[Tensor, "n G"] | None = None, *, threshold: float = 0.9,
              seed: int = 0) -> dict[str, Any]:
    """Score an SAE's decoder rows; with data x (and its true coeffs) also its codes sae.encode(x) and the controls."""
    W_dec = sae.W_dec.detach()
    if x is None:
        if coeffs is not None:
            raise InterplabError("coeffs need the data x they were sampled with")
        return score_dictionary(W_dec, true_features, threshold=threshold)
    x = x.to(W_dec.device, W_dec.dtype)
    codes = sae.encode(x) if coeffs is not None else None
    return score_with_controls(W_dec, true_features, x, codes=codes, coeffs=coeffs, threshold=threshold, seed=seed)
