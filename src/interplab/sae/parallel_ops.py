"""Communication for latent-sharded (tensor-parallel) dictionaries: two autograd ops and the global TopK.

Every rank holds the same batch and a slice of the latents. Two ops carry values and gradients between the ranks
(Megatron-LM's f and g, Shoeybi et al. 2019):

    copy_to_ranks(x)     forward  y_r = x on every rank r            backward  ∂L/∂x = Σ_r ∂L/∂y_r   (all-reduce)
    sum_over_ranks(p_r)  forward  y = Σ_r p_r, the same on all ranks  backward  ∂L/∂p_r = ∂L/∂y        (identity)

Once a value is summed over ranks the rest of the computation, hence the loss L, is replicated: every rank holds
∂L/∂y and calling backward on each rank's copy of L gives each rank the exact gradient of its own parameters (not
W times it). A tensor that every rank reads into its own slice (the encoder input) needs the sum of the ranks'
gradients, which `copy_to_ranks` supplies in its backward.

Outside a process group (or in a group of one) every function here is a no-op, so the same code runs unsharded.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torch.autograd.function import FunctionCtx

from interplab.distributed import all_gather_cat, all_reduce_sum_


def _all_reduce_sum(t: Tensor) -> Tensor:
    """A new tensor holding the sum of `t` over ranks."""
    return all_reduce_sum_(t.contiguous().clone())


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> Tensor:
        return _all_reduce_sum(g)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        return _all_reduce_sum(x)

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> Tensor:
        return g


def copy_to_ranks(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """Identity forward; backward all-reduces (sums) the gradient over ranks.

    For an input x that every rank r feeds into its own branch y_r = x, ∂L/∂x = Σ_r ∂L/∂y_r; each rank computes
    only its own term, and the all-reduce gives every rank the sum.
    """
    return _CopyToRanks.apply(x)


def sum_over_ranks(partial: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """All-reduce (sum) forward; identity backward.

    y = Σ_r p_r is replicated, so ∂L/∂p_r = ∂L/∂y, which every rank already holds: no communication backward.
    """
    return _SumOverRanks.apply(partial)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks of a tensor outside autograd (counts, statistics); returns a new tensor."""
    return _all_reduce_sum(t.detach())


def all_gather_columns(t: Float[Tensor, "batch c"]) -> Float[Tensor, "batch world_c"]:
    """Every rank's [batch, c] tensor side by side, in rank order: column block r comes from rank r."""
    return all_gather_cat(t, dim=1)


@torch.no_grad()
def choose_global_topk(values: Float[Tensor, "batch c"], k: int, rank: int, world_size: int,
                       ) -> tuple[Bool[Tensor, "batch c"], Float[Tensor, "batch k"]]:
    """Which of this rank's candidates are among each token's k largest over all ranks, and those k values.

    `values` are this rank's c candidates per token, each row in increasing latent order (the same c on every
    rank, W·c >= k; -inf marks a padding slot). They are all-gathered into [batch, W·c], rank-major; the token's
    threshold τ is the k-th largest. Every candidate > τ is chosen, and of those equal to τ the first ones in
    gathered order (lower rank, then lower latent index) until k are chosen: the first k positions of a stable
    descending sort, without sorting. The k values (in no particular order) are the same on every rank.
    """
    c = values.shape[1]
    gathered = all_gather_columns(values) if world_size > 1 else values  # [batch W·c]
    if gathered.shape[1] == k:                                           # (one rank with c = k) all are chosen
        return torch.ones_like(values, dtype=torch.bool), gathered
    top = gathered.topk(k, dim=-1, sorted=False).values                  # [batch k]
    tau = top.amin(dim=-1, keepdim=True)                                 # [batch 1]
    above, tied = gathered > tau, gathered == tau
    room = k - above.sum(dim=-1, keepdim=True)                           # how many of the tied still fit
    chosen = above | (tied & (tied.cumsum(dim=-1) <= room))
    return chosen[:, rank * c:(rank + 1) * c], top


@torch.no_grad()
def global_topk(pre: Float[Tensor, "batch m"], k: int, rank: int, world_size: int) -> Bool[Tensor, "batch m"]:
    """Which of this rank's latents are among each token's k largest pre-activations over all ranks.

    Each rank takes its local top c = min(k, m) (values and indices; the candidates sorted by latent index) and
    `choose_global_topk` picks the global top k among every rank's candidates, so every token keeps exactly k
    latents: all those with pre > τ (the token's k-th largest), and of those equal to τ the ones of lower rank
    first, then of lower latent index (torch.topk decides, as in the unsharded TopK, which entries equal to τ
    enter a rank's candidate list when more than c of them tie there).

    `pre` may hold -inf (excluded latents); the caller must make sure every token has at least k finite entries
    over all ranks. With world_size = 1 this is the plain per-token top k.
    """
    c = min(k, pre.shape[1])
    values, idx = pre.topk(c, dim=-1, sorted=False)                     # [batch c]
    idx, order = idx.sort(dim=-1)                                        # candidates by latent index
    mine, _ = choose_global_topk(values.gather(1, order), k, rank, world_size)
    return torch.zeros_like(pre, dtype=torch.bool).scatter_(1, idx, mine)
