"""How a decomposition compares with the true mechanisms, and what its important subcomponents do.

MMCS and ML2R (Braun et al. 2025 §3.1; Bushnaq et al. 2025 Table 1), for a rank-1 true mechanism T_k = a_k ⊗ b_k
(TMS: a = column i of W, b = e_i): read every subcomponent P_c along the mechanism's input direction b̂_k,

    cos_kc = (P_c b̂_k) · (T_k b̂_k) / (‖P_c b̂_k‖ ‖T_k b̂_k‖),      mcs(k) = argmax_c cos_kc
    MMCS = mean_k max_c cos_kc,      ML2R = mean_k ‖P_mcs(k) b̂_k‖ / ‖T_k b̂_k‖

which for TMS is exactly the papers' column formula (column j of U_c V_cᵀ against column j of W). Mechanisms of
higher rank (the +ID identity) have no column to match; they are scored by the number of live subcomponents.

Also: live subcomponents (causal importance above a threshold on some held-out input), the causal-importance
matrix on one-hot inputs, and the output distance to the target with only the important subcomponents kept
(masks 1 where g > threshold, else 0), with them ablated (the complement), with all on and all off.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.decompose.components import capture_inputs, masked_forward, module_key
from interplab.decompose.spd import Decomposition, causal_importances, output_distance
from interplab.decompose.truth import GroundTruthModel, output_loss_of

RANK_TOL = 1e-4
"""A true mechanism is rank 1 if its second singular value is below RANK_TOL times its first."""


class ColumnScores(NamedTuple):
    """MMCS and ML2R of one target against its rank-1 true mechanisms."""

    mmcs: float
    """Mean over mechanisms of the best cosine."""
    ml2r: float
    """Mean over mechanisms of the norm ratio of the best-matching subcomponent."""
    max_cos: list[float]
    """Per mechanism, its best cosine."""
    match: list[int]
    """Per mechanism, the index of its best-matching subcomponent."""


def rank_one_factors(truth: Float[Tensor, "n d_out d_in"]) -> tuple[Tensor, Tensor] | None:
    """(T_k b̂_k [n, d_out], b̂_k [n, d_in]) if every mechanism is rank 1 (b̂ its top right singular vector), else
    None."""
    U, S, Vh = torch.linalg.svd(truth)
    if S.shape[-1] > 1 and bool((S[:, 1] > RANK_TOL * S[:, 0]).any()):
        return None
    b = Vh[:, 0, :]
    return torch.einsum("kij,kj->ki", truth, b), b


def column_scores(matrices: Float[Tensor, "C d_out d_in"], truth: Float[Tensor, "n d_out d_in"]) -> ColumnScores | None:
    """MMCS and ML2R of subcomponents `matrices` against rank-1 `truth` (None if some mechanism is not rank 1)."""
    factors = rank_one_factors(truth.to(matrices.dtype))
    if factors is None:
        return None
    target, b = factors                                             # [n, d_out], [n, d_in]
    read = torch.einsum("cij,kj->kci", matrices, b)                 # P_c b̂_k: [n, C, d_out]
    cos = torch.einsum("kci,ki->kc", read, target) / (read.norm(dim=-1) * target.norm(dim=-1, keepdim=True)
                                                       ).clamp_min(1e-12)
    best, match = cos.max(dim=1)
    ratio = read.norm(dim=-1).gather(1, match[:, None])[:, 0] / target.norm(dim=-1).clamp_min(1e-12)
    return ColumnScores(float(best.mean()), float(ratio.mean()), best.tolist(), match.tolist())


def random_rank_one(like: Float[Tensor, "C d_out d_in"], gen: torch.Generator) -> Float[Tensor, "C d_out d_in"]:
    """The random-basis control: C rank-1 matrices u ⊗ v with Gaussian u, v (scaled to the same Frobenius norms)."""
    C, d_out, d_in = like.shape
    u = torch.randn(C, d_out, generator=gen, device=like.device)
    v = torch.randn(C, d_in, generator=gen, device=like.device)
    out = u[:, :, None] * v[:, None, :]
    return out * (like.flatten(1).norm(dim=1) / out.flatten(1).norm(dim=1)).view(C, 1, 1)


def importances_on(decomposition: Decomposition, truth: GroundTruthModel, x: Tensor) -> dict[str, Tensor]:
    """Per target, each subcomponent's importance on inputs x, in [0, 1]: SPD's g (clipped)."""
    if decomposition.importance is None:
        raise ValueError("importances_on needs an SPD decomposition; APD's are attributions (interplab.decompose.apd)")
    with torch.no_grad(), capture_inputs(truth.model, decomposition.targets) as inputs:
        truth.model(x)
        g = causal_importances(decomposition.components, decomposition.importance, inputs)
    return {name: v.clamp(0, 1) for name, v in g.lower.items()}


def random_subsets(keep: Float[Tensor, "... C"], gen: torch.Generator) -> Float[Tensor, "... C"]:
    """0/1 masks with as many ones per input as `keep` has, at uniformly random places (the random-subset control
    of the kept loss: the same number of subcomponents, not chosen by importance)."""
    ranks = torch.rand(keep.shape, generator=gen, device=keep.device).argsort(-1).argsort(-1)
    return (ranks < keep.sum(-1, keepdim=True)).to(keep.dtype)


def mask_losses(decomposition: Decomposition, truth: GroundTruthModel, x: Tensor,
                keep: dict[str, Tensor], gen: torch.Generator | None = None) -> dict[str, float]:
    """Output distance to the target with all subcomponents on, only the `keep` ones (0/1 masks), as many chosen
    at random (`kept_random`, drawn with `gen`), the `keep` ones ablated, and none."""
    model, kind = truth.model, output_loss_of(truth)
    comps = decomposition.components
    gen = gen or torch.Generator(device=x.device).manual_seed(0)
    with torch.no_grad():
        target = model(x)
        variants = {"all_on": {n: torch.ones_like(k) for n, k in keep.items()}, "kept": keep,
                    "kept_random": {n: random_subsets(k, gen) for n, k in keep.items()},
                    "ablated": {n: 1 - k for n, k in keep.items()},
                    "all_off": {n: torch.zeros_like(k) for n, k in keep.items()}}
        out = {}
        for name, masks in variants.items():
            with masked_forward(model, comps, masks):
                out[name] = float(output_distance(model(x), target, kind))
        out["target_vs_zero"] = float(output_distance(torch.zeros_like(target), target, kind)) if kind == "mse" \
            else float("nan")
    return out


def layer_matrices(decomposition: Decomposition) -> dict[str, Tensor]:
    """Each target's subcomponents as full matrices [C, d_out, d_in]."""
    with torch.no_grad():
        return {t: decomposition.components[module_key(t)].matrices() for t in decomposition.targets}


def score_columns(decomposition: Decomposition, truth: GroundTruthModel,
                  gen: torch.Generator) -> dict[str, dict[str, object]]:
    """Per target: MMCS/ML2R against the truth, and the same for a random rank-1 basis of the same size. A target
    without true components (e.g. resid-mlp's mlp_out) gets None for every score: it is judged by its live count."""
    true = truth.true_components()
    out: dict[str, dict[str, object]] = {}
    for name, mats in layer_matrices(decomposition).items():
        if name not in true:
            out[name] = dict.fromkeys(("n_true", "true_rank", "mmcs", "ml2r", "max_cos", "match", "random_basis_mmcs",
                                       "random_basis_ml2r"))
            continue
        scores = column_scores(mats, true[name])
        control = column_scores(random_rank_one(mats, gen), true[name])
        out[name] = {"n_true": int(true[name].shape[0]),
                     "true_rank": int(torch.linalg.matrix_rank(true[name]).max()),
                     "mmcs": None if scores is None else scores.mmcs,
                     "ml2r": None if scores is None else scores.ml2r,
                     "max_cos": None if scores is None else scores.max_cos,
                     "match": None if scores is None else scores.match,
                     "random_basis_mmcs": None if control is None else control.mmcs,
                     "random_basis_ml2r": None if control is None else control.ml2r}
    return out


def module_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear / nn.Embedding in the model (for messages)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
