"""BatchTopK SAE (Bussmann, Leask & Nanda 2024): k active latents per token on average over the batch.

    pre = (x − b_dec) @ W_enc + b_enc                         [batch d_sae]
    training:   f = ReLU(pre) kept at the batch's k·batch largest entries (BatchTopK)
    inference:  f = pre · 1[pre > θ]                          (a JumpReLU with one shared threshold θ)
    x̂   = f @ W_dec + b_dec,   L = mean_b ‖x_b − x̂_b‖² + α · AuxK   (as TopK)

θ estimates the smallest activation BatchTopK keeps: after each training batch, θ ← θ + λ_t (m_t − θ) with m_t
the batch's minimum kept activation and λ_t = max(1/t, 0.01) — a plain mean over the first 100 batches (so no bias
towards the initial 0, unlike a pure moving average), an exponential moving average after that. It is updated by
every `training_forward` run with gradients enabled (not by validation passes under torch.no_grad()).

Once trained, the SAE is a JumpReLU SAE and is saved as one (cfg.json architecture "jumprelu", `threshold` = θ for
every latent), so SAELens and our loader give the same inference outputs.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.distributed import all_reduce_min_
from interplab.sae.config import SAEConfig
from interplab.sae.selection import Selection, batchtopk_codes, encode_select
from interplab.sae.topk import TopKSAE

THRESHOLD_MIN_RATE = 0.01
"""λ_t never drops below this: θ becomes an exponential moving average with time constant 100 batches."""


class BatchTopKSAE(TopKSAE):
    """TopK over the whole batch during training; a single-threshold JumpReLU at inference."""

    arch = "batchtopk"
    threshold: Tensor
    threshold_updates: Tensor

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))  # θ: running estimate of the smallest kept activation
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))  # batches θ has seen

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Eval mode: pre · 1[pre > θ]. Training mode: BatchTopK over all tokens of `x`."""
        pre = self.pre_acts(x)                                   # [... d_sae]
        if not self.training:
            return pre.relu() * (pre > self.threshold)
        flat = pre.reshape(-1, pre.shape[-1])                    # [tokens d_sae]
        with torch.no_grad():
            codes, _ = batchtopk_codes(flat, self.cfg.k)
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[codes.rows, codes.cols] = True
        return (flat * keep).reshape(pre.shape)

    def _select(self, x_in: Float[Tensor, "batch d_in"], dead_mask: Tensor | None) -> Selection:
        return encode_select(x_in, self.W_enc, self.b_enc, self.cfg.k, batch_level=True, dead_mask=dead_mask,
                             aux_k=self.cfg.aux_k, batch_ranks=self.batch_ranks)

    @torch.no_grad()
    def update_threshold(self, f: Float[Tensor, " nnz"]) -> None:
        """θ ← θ + λ_t (min kept positive activation − θ), λ_t = max(1/t, THRESHOLD_MIN_RATE)."""
        positive = f[f > 0]
        smallest = positive.min() if positive.numel() else f.new_tensor(float("inf"))
        if self.batch_ranks > 1:  # the smallest kept activation of the whole data-parallel batch
            all_reduce_min_(smallest)
        if not bool(torch.isfinite(smallest)):
            return
        self.threshold_updates += 1
        rate = max(1.0 / float(self.threshold_updates), THRESHOLD_MIN_RATE)
        self.threshold += rate * (smallest.to(self.threshold.dtype) - self.threshold)

    def _observe(self, f: Float[Tensor, " nnz"]) -> None:
        if torch.is_grad_enabled():  # a training step, not a validation pass under no_grad
            self.update_threshold(f)
