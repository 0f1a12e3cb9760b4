"""SAE evaluation metrics as pure tensor functions: reconstruction, sparsity, downstream CE/KL, and error bars.

Key names follow SAELens's `evals.py` (the SAEBench "core" eval reports the same names):

    mse                          = mean_t ‖x_t − x̂_t‖²                  summed over d, mean over tokens (SAELens)
    explained_variance           = 1 − mse / Var(x),  Var(x) = mean_t ‖x_t − x̄‖²   (relative to the MEAN x̄, not 0)
    fvu                          = 1 − explained_variance                fraction of variance unexplained
    cossim                       = mean_t ⟨x_t, x̂_t⟩ / (‖x_t‖ ‖x̂_t‖)
    l2_norm_in, l2_norm_out      = mean_t ‖x_t‖, mean_t ‖x̂_t‖
    l2_ratio                     = mean_t ‖x̂_t‖ / ‖x_t‖                 < 1 means shrinkage
    relative_reconstruction_bias = mean_t ‖x̂_t‖² / mean_t ⟨x_t, x̂_t⟩      (Gao et al. eq. 10; 1 = no bias)

Sums are taken in float64, so a large mean component does not cancel away the variance.
Downstream: `kl_per_token`, `ce_loss_per_token`, `ce_loss_recovered`. Error bars: `mean_and_sem`, `ratio_with_sem`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError

DENSE_THRESHOLD = 0.1
"""A latent is dense when it fires on more than this fraction of tokens (10%, as in Anthropic's and SAEBench's
density plots, where such latents sit far right of the bulk of the log-density histogram)."""

_TINY = 1e-12


class MeanSEM(NamedTuple):
    mean: float
    """Sample mean (or, from `ratio_with_sem`, the ratio of two means)."""
    sem: float
    """Its standard error; NaN with fewer than two samples."""


class FiringCounts(NamedTuple):
    """Per-latent firing counts accumulated over many batches (add two with `merge`)."""

    n_tokens: int
    counts: Int[Tensor, " d_sae"]

    def merge(self, other: "FiringCounts") -> "FiringCounts":
        return FiringCounts(self.n_tokens + other.n_tokens, self.counts + other.counts)


def _flat(t: Tensor, name: str) -> Tensor:
    if t.ndim < 1 or t.numel() == 0:
        raise InterplabError(f"{name} must be a non-empty tensor [..., d], got shape {tuple(t.shape)}")
    return t.reshape(-1, t.shape[-1])


def _safe_div(a: Tensor, b: Tensor, fill: float = 0.0) -> Tensor:
    """a / b where |b| > tiny, else `fill`."""
    ok = b.abs() > _TINY
    return torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), torch.full_like(a, fill))


# ---- reconstruction ------------------------------------------------------------------------------------------
def reconstruction_metrics(x: Float[Tensor, "... d"], x_hat: Float[Tensor, "... d"]) -> dict[str, float]:
    """mse, explained_variance, fvu, cossim, l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias.

    Zero-norm tokens do not give NaN: cos and ‖x̂‖/‖x‖ count as 1 when both vectors are 0 and as 0 when only one is;
    with no variance in x, explained_variance is 1 if mse is 0 else 0 (as SAELens).
    """
    if x.shape != x_hat.shape:
        raise InterplabError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    xf, hf = _flat(x, "x").double(), _flat(x_hat, "x_hat").double()                # [n d]
    resid = (xf - hf).pow(2).sum(-1)                                                  # [n]
    mse = resid.mean()
    var = (xf - xf.mean(0)).pow(2).sum(-1).mean()
    ev = (1.0 - mse / var).item() if var > _TINY else (1.0 if mse <= _TINY else 0.0)
    n_in, n_out = xf.norm(dim=-1), hf.norm(dim=-1)                                   # [n]
    both_zero = (n_in <= _TINY) & (n_out <= _TINY)
    cos = torch.where(both_zero, 1.0, _safe_div((xf * hf).sum(-1), n_in * n_out))
    ratio = torch.where(both_zero, 1.0, _safe_div(n_out, n_in))
    dot = (xf * hf).sum(-1).mean()
    rrb = _safe_div(n_out.pow(2).mean(), dot, fill=math.nan).item() if n_out.abs().max() > _TINY else 0.0
    return {
        "mse": mse.item(),
        "explained_variance": ev,
        "fvu": 1.0 - ev,
        "cossim": cos.mean().item(),
        "l2_norm_in": n_in.mean().item(),
        "l2_norm_out": n_out.mean().item(),
        "l2_ratio": ratio.mean().item(),
        "relative_reconstruction_bias": rrb,
    }


# ---- sparsity ------------------------------------------------------------------------------------------------
def firing_counts(latents: Float[Tensor, "... d_sae"]) -> FiringCounts:
    """How many tokens each latent fired on (≠ 0, so signed architectures count too)."""
    flat = _flat(latents, "latents")
    return FiringCounts(flat.shape[0], (flat != 0).sum(0))


def density_histogram(counts: FiringCounts, n_bins: int = 40) -> dict[str, list[float]]:
    """Histogram of log10(firing frequency) over the latents that fired at least once.

    Edges run evenly from log10(1/n_tokens) (the rarest measurable frequency), rounded down to an integer, to 0.
    """
    lo = math.floor(math.log10(1.0 / max(counts.n_tokens, 1)))
    edges = torch.linspace(lo, 0.0, n_bins + 1, dtype=torch.float64)
    alive = counts.counts[counts.counts > 0].double()
    logf = torch.log10(alive / counts.n_tokens)                                       # [n_alive]
    hist = torch.histogram(logf, bins=edges).hist if logf.numel() else torch.zeros(n_bins, dtype=torch.float64)
    return {"log10_edges": edges.tolist(), "counts": [int(c) for c in hist.tolist()]}


def sparsity_metrics(
    latents: Float[Tensor, "... d_sae"],
    n_tokens_seen_fired: FiringCounts | tuple[int, Tensor] | None = None,
    *,
    dense_threshold: float = DENSE_THRESHOLD,
    n_bins: int = 40,
) -> dict[str, Any]:
    """l0, l1 (per token, mean) from `latents`; dead/dense fractions and the density histogram from firing counts.

    `n_tokens_seen_fired` = (n_tokens, per-latent firing counts) accumulated over more tokens than `latents` holds
    (see `firing_counts` and `FiringCounts.merge`); without it the counts come from `latents` alone.
        dead_fraction  = #{latents that never fired} / d_sae
        dense_fraction = #{latents with frequency > dense_threshold} / d_sae
        feature_density_hist = {"log10_edges": [...], "counts": [...]} over latents that fired (dead ones excluded)
    """
    flat = _flat(latents, "latents")                                                   # [n d_sae]
    counts = firing_counts(flat) if n_tokens_seen_fired is None else FiringCounts(*n_tokens_seen_fired)
    if counts.counts.shape != (flat.shape[-1],) or counts.n_tokens <= 0:
        raise InterplabError(f"firing counts must be (n_tokens > 0, tensor [{flat.shape[-1]}]), got "
                             f"({counts.n_tokens}, shape {tuple(counts.counts.shape)})")
    freq = counts.counts.double() / counts.n_tokens                                    # [d_sae]
    return {
        "l0": (flat != 0).sum(-1).double().mean().item(),
        "l1": flat.double().abs().sum(-1).mean().item(),
        "dead_fraction": (counts.counts == 0).double().mean().item(),
        "dense_fraction": (freq > dense_threshold).double().mean().item(),
        "dense_threshold": dense_threshold,
        "feature_density_hist": density_histogram(counts, n_bins),
    }


# ---- downstream ----------------------------------------------------------------------------------------------
def kl_per_token(
    clean_logits: Float[Tensor, "batch pos d_vocab"], patched_logits: Float[Tensor, "batch pos d_vocab"]
) -> Float[Tensor, "batch pos"]:
    """KL(P_clean ‖ P_patched) = Σ_v p_v (log p_v − log q_v), from log_softmax in ≥ float32 (float64 stays float64).

    Terms with p_v = 0 count 0. Not clamped at 0: rounding can leave values of about −1e-7 (float32).
    """
    if clean_logits.shape != patched_logits.shape:
        raise InterplabError(f"clean and patched logits differ in shape: {tuple(clean_logits.shape)} vs "
                             f"{tuple(patched_logits.shape)}")
    dtype = torch.promote_types(torch.promote_types(clean_logits.dtype, patched_logits.dtype), torch.float32)
    logp = clean_logits.to(dtype).log_softmax(-1)
    logq = patched_logits.to(dtype).log_softmax(-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


def ce_loss_per_token(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos-1"]:
    """Next-token cross-entropy −log P(tokens[:, t+1] | logits[:, t]), t = 0 … pos−2, in ≥ float32."""
    if logits.shape[:-1] != tokens.shape or tokens.shape[-1] < 2:
        raise InterplabError(f"need logits [batch pos d_vocab] and tokens [batch pos] with pos ≥ 2, got "
                             f"{tuple(logits.shape)} and {tuple(tokens.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = logits[:, :-1].to(dtype).log_softmax(-1)                                    # [batch pos-1 d_vocab]
    return -logp.gather(-1, tokens[:, 1:, None].long()).squeeze(-1)


class CleanLogProbs(NamedTuple):
    """log P and P of the clean run, computed once and shared by every variant's KL."""

    logp: Float[Tensor, "batch pos d_vocab"]
    p: Float[Tensor, "batch pos d_vocab"]
    p_log_p: Float[Tensor, "batch pos"]
    """Σ_v p_v log p_v (xlogy: p_v = 0 terms are 0)."""


def clean_log_probs(clean_logits: Float[Tensor, "batch pos d_vocab"]) -> CleanLogProbs:
    logp = clean_logits.to(torch.promote_types(clean_logits.dtype, torch.float32)).log_softmax(-1)
    p = logp.exp()
    return CleanLogProbs(logp, p, torch.xlogy(p, p).sum(-1))


def kl_and_ce_per_token(
    clean: CleanLogProbs, logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos-1"]]:
    """`kl_per_token(clean, logits)` and `ce_loss_per_token(logits, tokens)` from a single log-softmax of `logits`,
    worked in place: with many variants per batch over a large vocabulary these passes are most of the cost that is
    not the model itself. KL = Σ_v p_v log p_v − Σ_v p_v log q_v, the first sum computed once per clean run."""
    logq = logits.to(clean.logp.dtype).log_softmax(-1)                                 # [batch pos d_vocab]
    ce = -logq[:, :-1].gather(-1, tokens[:, 1:, None].long()).squeeze(-1)
    neg_cross = logq.mul_(clean.p).sum(-1)                                              # Σ p log q
    return clean.p_log_p - neg_cross, ce


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float, *, eps: float = 1e-6,
                      strict: bool = False) -> float:
    """(ce_ablated − ce_spliced) / (ce_ablated − ce_clean): 1 = as good as clean, 0 = as bad as ablating the site.

    Inputs are mean CE losses (floats or 0-d tensors). The score is undefined when ablating costs nothing,
    |ce_ablated − ce_clean| ≤ eps: then it is NaN, or an InterplabError if `strict`.
    """
    clean, spliced, ablated = (float(v) for v in (ce_clean, ce_spliced, ce_ablated))
    denom = ablated - clean
    if abs(denom) <= eps:
        if strict:
            raise InterplabError(f"CE-loss-recovered is undefined: ablated CE {ablated:.6g} equals clean CE "
                                 f"{clean:.6g} (|difference| ≤ {eps:g})")
        return math.nan
    return (ablated - spliced) / denom


# ---- error bars ----------------------------------------------------------------------------------------------
def mean_and_sem(values: Tensor) -> MeanSEM:
    """(mean, s/√n) over all elements, s the sample standard deviation (n − 1); sem is NaN when n = 1."""
    v = values.detach().reshape(-1).double()
    if v.numel() == 0:
        raise InterplabError("mean_and_sem needs at least one value, got none")
    sem = (v.std(correction=1) / math.sqrt(v.numel())).item() if v.numel() > 1 else math.nan
    return MeanSEM(v.mean().item(), sem)


def ratio_with_sem(a: Tensor, b: Tensor) -> MeanSEM:
    """R = ā / b̄ from paired samples (a_i, b_i) (e.g. per-token KL_sae and KL_eps_random), with a delta-method SEM.

        Var(R) ≈ (1/n) (σ_a² − 2R σ_ab + R² σ_b²) / b̄²   i.e.   sem = std(a_i − R·b_i) / (√n · |b̄|)

    (σ with n − 1.) Pairing matters: a and b are positively correlated per token, which shrinks the error.
    b̄ = 0 raises an InterplabError.
    """
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    if a.shape != b.shape or a.numel() == 0:
        raise InterplabError(f"ratio_with_sem needs paired non-empty samples, got {a.numel()} and {b.numel()}")
    b_mean = b.mean()
    if b_mean.abs() <= _TINY:
        raise InterplabError("ratio_with_sem: the denominator's mean is 0, the ratio is undefined")
    r = a.mean() / b_mean
    n = a.numel()
    sem = ((a - r * b).std(correction=1) / (math.sqrt(n) * b_mean.abs())).item() if n > 1 else math.nan
    return MeanSEM(r.item(), sem)
