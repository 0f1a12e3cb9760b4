"""Controls for an SAE splice: replacement activations to put at the hook instead of x (or of the SAE's x̂).

With x the clean activation, x̂ the SAE's reconstruction and ‖·‖ the L2 norm over the last dim, per token:

    epsilon_random               x + ‖x − x̂‖ · u,   u uniform on the unit sphere       same error norm, isotropic
    sae_norm_patch               x · ‖x̂‖ / ‖x‖                                           x's direction, x̂'s norm
    sae_output_at_original_norm  x̂ · ‖x‖ / ‖x̂‖                                           x̂'s direction, x's norm
    covariance_matched_error     x + e,  e ~ N(0, Σ_err) (rescaled to ‖x − x̂‖ by default) the SAE errors' shape
    zero_ablation, mean_ablation 0,  μ

A ratio with a zero denominator counts as 0 (so ‖x‖ = 0 gives 0 from `sae_norm_patch`), never NaN. Random controls
take an explicit torch.Generator (on the device of x) and are reproducible under its seed. Arithmetic runs in at
least float32; results come back in x's dtype.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.errors import InterplabError

_TINY = 1e-12


def _check(x: Tensor, x_hat: Tensor) -> torch.dtype:
    if x.shape != x_hat.shape or x.ndim < 1:
        raise InterplabError(f"x and x_hat must share a shape [..., d], got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    return torch.promote_types(torch.promote_types(x.dtype, x_hat.dtype), torch.float32)


def _norm(t: Tensor) -> Tensor:
    return t.norm(dim=-1, keepdim=True)                                               # [... 1]


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    """a / b, with 0 where b ≈ 0."""
    ok = b > _TINY
    return torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), torch.zeros_like(a))


def random_unit_vectors(shape: torch.Size | tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Float[Tensor, "... d"]:
    """u = g / ‖g‖, g ~ N(0, I): uniform on the unit sphere in the last dim, so E[u] = 0 and E[u uᵀ] = I/d."""
    g = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    return g / _norm(g).clamp_min(_TINY)


def epsilon_random(x: Float[Tensor, "... d"], x_hat: Float[Tensor, "... d"], gen: torch.Generator,
                   ) -> Float[Tensor, "... d"]:
    """x + ‖x − x̂‖ · u with u a fresh uniform unit vector per token: the SAE's error norm in a random direction."""
    dtype = _check(x, x_hat)
    xd = x.to(dtype)
    eps = _norm(xd - x_hat.to(dtype))                                                 # [... 1]
    u = random_unit_vectors(x.shape, gen, dtype, x.device)                            # [... d]
    return (xd + eps * u).to(x.dtype)


def sae_norm_patch(x: Float[Tensor, "... d"], x_hat: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
    """x · ‖x̂‖ / ‖x‖: the original direction at the SAE output's norm (0 where ‖x‖ = 0)."""
    dtype = _check(x, x_hat)
    xd = x.to(dtype)
    return (xd * _ratio(_norm(x_hat.to(dtype)), _norm(xd))).to(x.dtype)


def sae_output_at_original_norm(x: Float[Tensor, "... d"], x_hat: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
    """x̂ · ‖x‖ / ‖x̂‖: the SAE output's direction at the original norm (0 where ‖x̂‖ = 0)."""
    dtype = _check(x, x_hat)
    hd = x_hat.to(dtype)
    return (hd * _ratio(_norm(x.to(dtype)), _norm(hd))).to(x.dtype)


def error_covariance_factor(errors: Float[Tensor, "... d"], *, ridge: float = 1e-6, center: bool = True,
                            ) -> Float[Tensor, "d d"]:
    """A factor L [d d] with L Lᵀ = Σ_err + λI, from SAE errors e = x − x̂ (rows; leading dims are flattened).

        Σ_err = (1/(n−1)) Σ_t (e_t − ē)(e_t − ē)ᵀ          (center=False: the second moment (1/n) Σ_t e_t e_tᵀ)
        λ     = ridge · tr(Σ_err) / d                       keeps the factor well defined when Σ_err is singular
        L     = V diag(√max(λ_i, 0)),  Σ_err + λI = V diag(λ_i) Vᵀ   (eigendecomposition in float64)

    Returned in float32 (float64 if the errors are float64).
    """
    if errors.ndim < 1 or errors.numel() == 0:
        raise InterplabError(f"errors must be a non-empty tensor [..., d], got shape {tuple(errors.shape)}")
    e = errors.detach().reshape(-1, errors.shape[-1]).double()                        # [n d]
    n, d = e.shape
    if n < 2:
        raise InterplabError(f"error_covariance_factor needs at least 2 error vectors, got {n}")
    if center:
        e = e - e.mean(0)
        cov = e.T @ e / (n - 1)
    else:
        cov = e.T @ e / n                                                             # [d d]
    cov = cov + ridge * (cov.trace() / d) * torch.eye(d, dtype=cov.dtype, device=cov.device)
    evals, evecs = torch.linalg.eigh(cov)
    factor = evecs * evals.clamp_min(0).sqrt()                                        # [d d], column i scaled
    return factor.to(torch.promote_types(errors.dtype, torch.float32))


def covariance_matched_error(x: Float[Tensor, "... d"], x_hat: Float[Tensor, "... d"], errors_cov_factor: Tensor,
                             gen: torch.Generator, *, match_norm: bool = True) -> Float[Tensor, "... d"]:
    """x + e with e = L z, z ~ N(0, I), L from `error_covariance_factor` (so e ~ N(0, Σ_err)).

    With `match_norm` (default) each e is rescaled to ‖x − x̂‖, as in `epsilon_random`: the two controls then differ
    only in the distribution of the error's direction (isotropic vs shaped like the SAE's errors), which is the
    comparison that says whether the SAE's error directions are special. Without it, e keeps its Gaussian norm
    (covariance exactly Σ_err, norms not matched per token).
    """
    dtype = _check(x, x_hat)
    d = x.shape[-1]
    if errors_cov_factor.shape != (d, d):
        raise InterplabError(f"errors_cov_factor must be [{d}, {d}] for activations of width {d}, "
                             f"got {tuple(errors_cov_factor.shape)}")
    xd = x.to(dtype)
    z = torch.randn(x.shape, generator=gen, dtype=dtype, device=x.device)             # [... d]
    e = z @ errors_cov_factor.to(dtype=dtype, device=x.device).T                      # [... d], e = L z per token
    if match_norm:
        e = e * _ratio(_norm(xd - x_hat.to(dtype)), _norm(e))
    return (xd + e).to(x.dtype)


def zero_ablation(x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
    """0 at every position."""
    return torch.zeros_like(x)


def mean_ablation(x: Float[Tensor, "... d"], mean: Float[Tensor, " d"]) -> Float[Tensor, "... d"]:
    """The mean activation μ [d] (e.g. over the evaluation tokens) at every position."""
    if mean.shape != x.shape[-1:]:
        raise InterplabError(f"mean must have shape [{x.shape[-1]}], got {tuple(mean.shape)}")
    return mean.to(dtype=x.dtype, device=x.device).expand_as(x).clone()
