"""Belief patching (Shai et al. 2024): move the residual stream's belief component from one sequence into another
and watch the next-token distribution follow, beside a random-subspace control.

Map. At one hook, the affine least-squares map from activations onto the beliefs, η̂ = a W + c (W: [d, S]), fitted on
every position of sampled sequences. With Σ the activations' covariance and C = Cov(a, η), least squares gives
Σ W = C. The belief subspace is the column space of Σ W = C (orthonormalised: left singular vectors of C with
singular value above 1e-6 of the largest): the directions along which the activations move with the beliefs, i.e.
the regression weights carried back through the activation covariance (the row space of the reverse regression
η → a). Because Σ_s η_s = 1 at every point, C 1 = 0 and W 1 = 0: the subspace has dimension S − 1 (2 for Mess3).

Why not the column space of W itself (the row space of sklearn's coef_ = Wᵀ)? The readout depends on a only
through that space, so patching it makes the readout of B equal A's exactly, but W = Σ⁻¹ C is dominated by the
activations' lowest-variance directions: on a trained Mess3 toy (2 layers, d_model 16) it holds 0.0% of the
activation variance and patching it moves the prediction 0%, while col(C) moves it 99.8%. It is reported as the
`readout` condition beside the random control, so the difference stays visible.

Patch. Sequences A and B of the same length; at the LAST position only (the one whose next-token distribution is
read), B's activation a_B becomes

    a_B + (a_A − a_B) Q Qᵀ          (B's component in span Q replaced by A's; the rest of a_B kept)

Only the last position is edited: earlier positions hold B's earlier beliefs and later layers still attend to them
(at the final layer's resid_post nothing does). The fraction of the activations' variance each subspace holds is
reported beside its effect (`variance`), so a patch that moves the prediction only because its subspace holds most
of the residual stream shows as such.

Read-out. With q the model's next-token distribution at the last position and p_A = P(· | η_A), p_B = P(· | η_B) the
Bayes-optimal predictions for A's and B's beliefs, KL(p_A ‖ q) and KL(p_B ‖ q) (nats) for q = q_B (before), q after
the belief patch, and q after the control: the same patch through a random orthonormal subspace of the same
dimension (seeded). `moved` = [KL(p_A ‖ q_B) − KL(p_A ‖ q_patched)] / [KL(p_A ‖ q_B) − KL(p_A ‖ q_A)]: the fraction
of the way from B's clean prediction to A's clean prediction, 1 when patching recovers A's clean KL (as a ratio of
means over pairs, since single pairs with p_A ≈ p_B have a vanishing denominator).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.beliefs.msp import belief_states
from interplab.beliefs.process import Process, next_token_probabilities, sample
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel

FIT_SEED_OFFSET = 3_000_017
"""The map is fitted on sequences drawn with seed + this, the pairs on seed + 2 · this (no training step uses them)."""
RANK_TOL = 1e-6
"""Singular values of W below this fraction of the largest are not part of the belief subspace."""


class AffineMap(NamedTuple):
    """η̂ = a W + c, fitted by least squares, with its in-sample R² (pooled over belief coordinates)."""

    W: Float[Tensor, "d s"]
    c: Float[Tensor, " s"]
    r2: float
    C: Float[Tensor, "d s"]
    """Cov(a, η) of the fitted points (= Σ W): its column space is the belief subspace."""
    cov: Float[Tensor, "d d"]
    """Σ, the activations' covariance (for the variance each patched subspace holds)."""


class KLs(NamedTuple):
    """KL (nats) of the model's last-position prediction from the Bayes-optimal ones, per pair."""

    to_a: Float[Tensor, " n"]
    """KL(p_A ‖ q)."""
    to_b: Float[Tensor, " n"]
    """KL(p_B ‖ q)."""


class Patched(NamedTuple):
    """B's prediction after moving its component in one subspace onto A's."""

    kl: KLs
    variance: float
    """tr(Qᵀ Σ Q) / tr Σ: the fraction of the activations' variance the subspace holds."""


class BeliefPatch(NamedTuple):
    """Belief patching at one hook: KLs before, after the belief patch and after the controls."""

    hook: str
    dim: int
    """Dimension of the belief subspace (and of the others)."""
    fit_r2: float
    """R² of the affine map the subspace comes from (every position of the fitted sequences)."""
    clean_a: KLs
    """A's own clean run: KL(p_A ‖ q_A) is the floor the patch can reach."""
    before: KLs
    """B's clean run."""
    belief: Patched
    """B's component in the belief subspace (col C) replaced by A's."""
    readout: Patched
    """B's component in col W (the readout's own, Σ⁻¹-weighted subspace) replaced by A's."""
    random: Patched
    """B's component in a random subspace replaced by A's (the control)."""


def fit_affine(X: Float[Tensor, "n d"], Y: Float[Tensor, "n s"]) -> AffineMap:
    """Least squares Y ≈ X W + c (minimum-norm W where X is rank-deficient), in float64."""
    X, Y = X.double(), Y.double()
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    W = torch.linalg.lstsq(Xc, Yc, rcond=1e-10, driver="gelsd").solution
    r2 = 1 - float(((Xc @ W - Yc) ** 2).sum() / (Yc ** 2).sum())
    return AffineMap(W, Y.mean(0) - X.mean(0) @ W, r2, Xc.T @ Yc / len(X), Xc.T @ Xc / len(X))


def belief_subspace(W: Float[Tensor, "d s"]) -> Float[Tensor, "d k"]:
    """An orthonormal basis of the column space of W ([d, s]; rank k)."""
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    return U[:, S > S[0] * RANK_TOL]


def random_subspace(d: int, k: int, seed: int) -> Float[Tensor, "d k"]:
    """An orthonormal basis of a uniformly random k-dimensional subspace of R^d (QR of a Gaussian matrix)."""
    g = torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(g).Q


@torch.no_grad()
def last_position_probs(model: HookedModel, tokens: Int[Tensor, "n L"], hook: str,
                        Q: Float[Tensor, "d k"] | None = None,
                        source: Float[Tensor, "n d"] | None = None) -> Float[Tensor, "n x"]:
    """The model's next-token distribution at the last position, with the last position's activation at `hook`
    moved onto `source` within span Q (a + (source − a) Q Qᵀ) when Q is given."""
    if Q is None:
        return model.run_with_hooks(tokens.to(model.device), []).double().softmax(-1)[:, -1].cpu()
    proj = Q.to(model.device)

    def patch(act: Tensor, name: str) -> Tensor:
        act = act.clone()
        last = act[:, -1].double()
        assert source is not None
        act[:, -1] = (last + (source.to(act.device) - last) @ proj @ proj.T).to(act.dtype)
        return act

    return model.run_with_hooks(tokens.to(model.device), [(hook, patch)]).double().softmax(-1)[:, -1].cpu()


def _kl(p: Float[Tensor, "n x"], q: Float[Tensor, "n x"]) -> Float[Tensor, " n"]:
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q.clamp_min(1e-30))).sum(-1)


@torch.no_grad()
def hook_activations(model: HookedModel, tokens: Int[Tensor, "n L"], hook: str) -> Float[Tensor, "n L d"]:
    return model.run_with_cache(tokens.to(model.device), [hook]).cache[hook].double().cpu()


def belief_patch(model: HookedModel, process: Process, hook: str, ctx: int, *, n_pairs: int = 256,
                 n_fit: int = 2048, seed: int = 0) -> BeliefPatch:
    """Patch the belief subspace at `hook` from sequence A into B over n_pairs sampled pairs of length ctx, beside
    the readout and random subspaces (see the module docstring); the map is fitted on every position of n_fit
    sampled sequences. Seeded: the fit, the pairs and the random subspace."""
    model.check_hook_names([hook])
    if model.hook_dim(hook) is None:
        raise InterplabError(f"{hook}: belief patching needs a hook with one vector per position (a residual "
                             "stream, attention or MLP output), not attention patterns")
    if n_pairs < 2 or n_fit < 2:
        raise InterplabError(f"belief patching needs at least 2 pairs and 2 fitted sequences; got {n_pairs}, {n_fit}")
    tokens = sample(process, n_fit, ctx, seed=seed + FIT_SEED_OFFSET)
    acts = hook_activations(model, tokens, hook)
    fit = fit_affine(acts.reshape(-1, acts.shape[-1]), belief_states(process, tokens).reshape(-1, process.n_states))
    Q = belief_subspace(fit.C)
    subspaces = (Q, belief_subspace(fit.W)[:, :Q.shape[1]], random_subspace(Q.shape[0], Q.shape[1], seed))
    pairs = sample(process, 2 * n_pairs, ctx, seed=seed + 2 * FIT_SEED_OFFSET)
    a, b = pairs[:n_pairs], pairs[n_pairs:]
    p_a, p_b = (next_token_probabilities(process, belief_states(process, t)[:, -1]) for t in (a, b))
    source = hook_activations(model, a, hook)[:, -1]

    def kls(q: Tensor) -> KLs:
        return KLs(_kl(p_a, q), _kl(p_b, q))

    def patched(S: Tensor) -> Patched:
        return Patched(kls(last_position_probs(model, b, hook, S, source)),
                       float(torch.trace(S.T @ fit.cov @ S) / torch.trace(fit.cov)))

    return BeliefPatch(hook, Q.shape[1], fit.r2, kls(last_position_probs(model, a, hook)),
                       kls(last_position_probs(model, b, hook)), *(patched(S) for S in subspaces))


def _mean_sem(x: Tensor) -> dict[str, float]:
    return {"mean": float(x.mean()), "sem": float(x.std() / len(x) ** 0.5) if len(x) > 1 else 0.0}


def summarise(result: BeliefPatch) -> dict[str, Any]:
    """JSON numbers: mean and SEM over pairs of every KL, each subspace's variance fraction, and the fraction
    `moved` of each patch (see the module docstring)."""
    gap = float(result.before.to_a.mean() - result.clean_a.to_a.mean())
    out: dict[str, Any] = {"hook": result.hook, "dim": result.dim, "fit_r2": result.fit_r2,
                           "n_pairs": len(result.before.to_a)}
    for name in ("clean_a", "before"):
        kl: KLs = getattr(result, name)
        out[name] = {"kl_to_a": _mean_sem(kl.to_a), "kl_to_b": _mean_sem(kl.to_b)}
    for name in ("belief", "readout", "random"):
        p: Patched = getattr(result, name)
        out[name] = {"kl_to_a": _mean_sem(p.kl.to_a), "kl_to_b": _mean_sem(p.kl.to_b), "variance": p.variance,
                     "moved": float(result.before.to_a.mean() - p.kl.to_a.mean()) / gap if gap > 0 else None}
    return out
