"""SPD's causal-importance functions: one tiny MLP per subcomponent, through leaky hard sigmoids.

    g_c(x) = σ_H(γ_c(h_c(x)))         h_c = V[:, c] · a(x), the subcomponent's inner activation (a scalar)
    γ_c(h) = w2_c · GELU(w1_c h + b1_c) + b2_c       (one hidden layer of `hidden` GELU units per subcomponent)

Two leaky hard sigmoids (slope 0.01 outside the flat part, so no gradient dies there; Bushnaq et al. 2025, App.):
- lower-leaky, σ_lower(x) = 0.01 x for x < 0, x on [0, 1], 1 above: the g that sets the masks (a subcomponent that
  does not matter may be scaled a little below 0, but never above 1);
- upper-leaky, σ_upper(x) = 0 below 0, x on [0, 1], 1 + 0.01 (x − 1) above: the g in the importance-minimality
  penalty (it must not go negative, else the penalty would reward it).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F

LEAK = 0.01
"""Slope of the leaky parts."""


def lower_leaky_hard_sigmoid(x: Tensor, leak: float = LEAK) -> Tensor:
    """leak·x below 0, x on [0, 1], 1 above 1."""
    return torch.where(x < 0, leak * x, x.clamp(max=1.0))


def upper_leaky_hard_sigmoid(x: Tensor, leak: float = LEAK) -> Tensor:
    """0 below 0, x on [0, 1], 1 + leak·(x − 1) above 1."""
    return torch.where(x > 1, 1 + leak * (x - 1), x.clamp(min=0.0))


class ImportanceMLPs(nn.Module):
    """C independent scalar MLPs 1 → hidden (GELU) → 1, evaluated in parallel: γ_c(h_c) for every c."""

    def __init__(self, C: int, hidden: int, gen: torch.Generator, device: torch.device | str = "cpu") -> None:
        super().__init__()
        # He init for the GELU layer (fan-in 1), 1/sqrt(fan-in) for the linear read-out; biases at 0.
        self.w1 = nn.Parameter(torch.randn(C, hidden, generator=gen, device=device) * math.sqrt(2.0))
        self.b1 = nn.Parameter(torch.zeros(C, hidden, device=device))
        self.w2 = nn.Parameter(torch.randn(C, hidden, generator=gen, device=device) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(C, device=device))

    def forward(self, h: Float[Tensor, "... C"]) -> Float[Tensor, "... C"]:
        """The pre-sigmoid outputs γ_c(h_c) (through `ScalarMLPs`, a hand-written backward: the same numbers as
        autograd on `(GELU(h w1 + b1) · w2).sum(-1) + b2`, at about half the CPU time)."""
        lead = h.shape[:-1]
        out = ScalarMLPs.apply(h.reshape(-1, h.shape[-1]), self.w1, self.b1, self.w2, self.b2)
        return out.reshape(*lead, h.shape[-1])


class ScalarMLPs(torch.autograd.Function):
    """C scalar GELU MLPs on h [B, C] with the C axis leading, so every sum over the batch or the hidden units is one
    batched matrix product instead of a broadcast multiply and a reduction (the hidden tensor [C, B, H] is the
    cost: it is written twice and read four times per step, against about twice that through plain autograd).

        z = h w1 + b1 [C, B, H],  a = GELU(z),  γ = a · w2 + b2
        ∂w2 = Σ_b ∂γ a,  ∂z = GELU'(z) ∂γ w2,  ∂w1 = Σ_b h ∂z,  ∂b1 = Σ_b ∂z,  ∂h = ∂z · w1,  ∂b2 = Σ_b ∂γ
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                b2: Tensor) -> Tensor:
        hT = h.T.contiguous()                                                    # [C, B]
        z = torch.addcmul(b1[:, None, :], hT[:, :, None], w1[:, None, :])       # [C, B, H]
        a = F.gelu(z)
        ctx.save_for_backward(hT, z, a, w1, w2)
        return torch.bmm(a, w2[:, :, None])[..., 0].T + b2

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        hT, z, a, w1, w2 = ctx.saved_tensors                                     # type: ignore[attr-defined]
        gT = grad.T.contiguous()                                                 # [C, B]
        gz = torch.ops.aten.gelu_backward(gT[:, :, None] * w2[:, None, :], z)  # [C, B, H]
        return (torch.bmm(gz, w1[:, :, None])[..., 0].T, torch.bmm(hT[:, None, :], gz)[:, 0], gz.sum(1),
                torch.bmm(gT[:, None, :], a)[:, 0], grad.sum(0))


def importance_minimality(g_upper: dict[str, Float[Tensor, "batch C"]], p: float) -> Float[Tensor, ""]:
    """Σ_l Σ_c |g_c^l(x)|^p, averaged over the batch (g from the upper-leaky sigmoid, so already >= 0)."""
    return sum(g.abs().pow(p).sum(-1).mean() for g in g_upper.values())
