"""Data-parallel SAE training under torchrun: one all-reduce per SAE per step.

Every rank holds the whole SAE and reads the same global batch; rank r trains on rows [r·b, (r+1)·b) of it
(b = batch_size / world_size). Because each rank's loss is a mean over its b rows, the mean of the ranks'
gradients is the gradient of the whole batch's loss:

    ∇ (1/B) Σ_{i<B} ℓ_i  =  (1/R) Σ_r ∇ (1/b) Σ_{i in rank r} ℓ_i          (B = R·b)

so after the all-reduce every rank takes the same Adam step, applies the same decoder-norm constraint to the same
weights, and the run equals a one-process run on the whole batch up to float rounding. The same collective carries
the step's statistics (the loss, L0 and squared error summed over rows, and how often each latent fired), so the
dead-latent counters, the AuxK dead mask and the logged metrics are those of the whole batch on every rank.

We reduce in one flat bucket ourselves rather than wrap the SAE in `torch.nn.parallel.DistributedDataParallel`:
the trainer calls `training_forward`, not `forward` (which DDP hooks), and packing the statistics into the
gradients' bucket makes a step cost exactly one collective. DDP would overlap the reduction with the backward pass;
here the backward is the cheap sparse part of the step, so there is little to overlap.
"""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.distributed import all_reduce_sum_


def reduce_gradients(params: Iterable[nn.Parameter], stats: Float[Tensor, " n"], world_size: int
                     ) -> Float[Tensor, " n"]:
    """Average every parameter's gradient over ranks (in place) and return `stats` summed over ranks.

    A parameter without a gradient on this rank counts as a zero gradient, so that every rank sends a bucket of
    the same layout.
    """
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    bucket = torch.cat([g.reshape(-1).float() for g in grads] + [stats.float()])
    all_reduce_sum_(bucket)
    n_grads = sum(p.numel() for p in params)
    bucket[:n_grads].div_(world_size)
    offset = 0
    for p in params:  # the gradients become views of the bucket: no copy back
        p.grad = bucket[offset:offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
    return bucket[n_grads:]


def bucket_bytes(sae: nn.Module, stats: int) -> int:
    """Bytes of one rank's all-reduce bucket per step: every parameter plus `stats` float32 statistics."""
    return 4 * (sum(p.numel() for p in sae.parameters()) + stats)
