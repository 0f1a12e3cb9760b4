"""ReLU SAE with an L1 penalty weighted by decoder norms (Anthropic, "Circuits Updates — April 2024").

    pre  = x @ W_enc + b_enc                     (x − b_dec if cfg.apply_b_dec_to_input; default: not subtracted)
    f    = ReLU(pre)
    x̂    = f @ W_dec + b_dec
    L    = mean_b ‖x_b − x̂_b‖² + λ · mean_b Σ_i f_bi ‖W_dec[i]‖

The decoder norms are free (not constrained to 1): the penalty's ‖W_dec[i]‖ factor makes the loss invariant to
rescaling a latent, which is what the April update replaced the unit-norm constraint with. Following that update
the encoder reads x itself, so cfg.json says apply_b_dec_to_input = false and SAELens computes the same thing.

The training step is one custom autograd function that does exactly five dense matrix products (encoder and
decoder forward; ∂W_dec, ∂f and ∂W_enc) block by block over the batch, so that the [block, d_sae] activations and
their gradient stay in cache and no [batch, d_sae] tensor is ever allocated. Because the loss is a sum over tokens,
each block's contribution to the parameter gradients is complete once its reconstruction is known, so they are
accumulated during the forward pass and the backward pass only scales them by the incoming gradient. That shortcut
covers backpropagating `loss` (the training case); any other combination of the outputs (mse alone, recon, ...) or
a gradient for x falls back to plain autograd on the same formulas.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torch.autograd.function import FunctionCtx

from interplab.sae.base import SparseAutoencoder, TrainOutput

RELU_CHUNK = 1024
"""Tokens per block of the fused ReLU SAE step."""


def _reference(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, l1: float,
               subtract_b_dec: bool, target: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, recon, mse, l1_term) of reconstructing `target` (default x) from x, with plain autograd: the
    definition, and the fallback backward."""
    target = x if target is None else target
    f = torch.relu((x - b_dec if subtract_b_dec else x) @ W_enc + b_enc)     # [batch d_sae]
    recon = f @ W_dec + b_dec                                                 # [batch d_in]
    mse = (recon - target).pow(2).sum(-1).mean()
    l1_term = l1 * (f.sum(0) @ W_dec.norm(dim=1)) / x.shape[0]
    return mse + l1_term, recon, mse, l1_term


class _ReLUSAELoss(torch.autograd.Function):
    """(loss, recon, mse, l1_term, l0_count, f_colsum) of a batch reconstructing `target` (x for an SAE) from x;
    parameter gradients accumulated block by block."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, l1: float,
                subtract_b_dec: bool, want_grads: bool, target: Tensor | None = None) -> tuple[Tensor, ...]:
        ctx.has_target = target is not None
        target = x if target is None else target
        batch, d_sae = x.shape[0], W_enc.shape[1]
        x_in = x - b_dec if subtract_b_dec else x                               # [batch d_in]
        norms = W_dec.norm(dim=1).clamp_min(1e-12)                              # [d_sae]
        recon = torch.empty_like(x)                                             # [batch d_in]
        f_colsum, sq_err = x.new_zeros(d_sae), x.new_zeros(())
        l0_count = torch.zeros((), dtype=torch.float64, device=x.device)      # exact count of nonzeros
        f_block = x.new_empty(min(RELU_CHUNK, batch), d_sae)
        if want_grads:
            grad_pre_block = torch.empty_like(f_block)
            g_W_enc, g_b_enc = torch.zeros_like(W_enc), torch.zeros_like(b_enc)
            g_W_dec, g_b_dec = torch.zeros_like(W_dec), torch.zeros_like(b_dec)
            l1_grad_f = norms * (l1 / batch)                                    # ∂(λ·mean Σ f‖W_dec‖)/∂f
        for start in range(0, batch, RELU_CHUNK):
            end = min(start + RELU_CHUNK, batch)
            xb = x_in[start:end]                                                # [block d_in]
            f = torch.addmm(b_enc, xb, W_enc, out=f_block[: end - start]).relu_()        # matmul 1 [block d_sae]
            r = torch.addmm(b_dec, f, W_dec, out=recon[start:end])                      # matmul 2 [block d_in]
            diff = r - target[start:end]
            sq_err += diff.pow(2).sum()
            f_colsum += f.sum(0)
            l0_count += f.sign().sum()                                          # f >= 0; ~20x faster than (f > 0)
            if want_grads:
                gr = diff.mul_(2.0 / batch)                                     # ∂mse/∂x̂ [block d_in]
                g_W_dec.addmm_(f.T, gr)                                         # matmul 3
                g_b_dec += gr.sum(0)
                gp = torch.addmm(l1_grad_f, gr, W_dec.T, out=grad_pre_block[: end - start])  # matmul 4: ∂L/∂f
                torch.ops.aten.threshold_backward.grad_input(gp, f, 0, grad_input=gp)      # ReLU mask, in place
                g_W_enc.addmm_(xb.T, gp)                                        # matmul 5
                g_b_enc += gp.sum(0)
        mse = sq_err / batch
        l1_term = l1 * (f_colsum @ norms) / batch                               # λ · mean_b Σ_i f_bi ‖W_dec[i]‖
        if want_grads:
            g_W_dec.addcmul_(W_dec, (f_colsum * (l1 / batch) / norms)[:, None])  # ∂/∂W_dec of λ/B Σ_i F_i ‖W_dec[i]‖
            if subtract_b_dec:
                g_b_dec -= W_enc @ g_b_enc
        grads = (g_W_enc, g_b_enc, g_W_dec, g_b_dec) if want_grads else ()
        # inputs too (in-place changes are detected); recon for ∂loss/∂target = (2/B)(target − recon)
        ctx.save_for_backward(x, W_enc, b_enc, W_dec, b_dec, target, recon, *grads)
        ctx.l1, ctx.subtract_b_dec, ctx.want_grads = l1, subtract_b_dec, want_grads
        l0_count = l0_count.to(x.dtype)
        ctx.mark_non_differentiable(l0_count, f_colsum)
        return mse + l1_term, recon, mse, l1_term, l0_count, f_colsum

    @staticmethod
    def backward(ctx: FunctionCtx, g_loss: Tensor, g_recon: Tensor, g_mse: Tensor, g_l1: Tensor, *_: Tensor,
                 ) -> tuple[Tensor | None, ...]:
        saved, given = ctx.saved_tensors, len(ctx.needs_input_grad)  # given: 9 with a target argument, else 8
        need = [*ctx.needs_input_grad[:5], ctx.has_target and ctx.needs_input_grad[8]]  # x, params, target
        if ctx.want_grads and not need[0] and not g_mse.any() and not g_l1.any() and not g_recon.any():
            target, recon = saved[5], saved[6]
            g_target = g_loss * (2.0 / len(target)) * (target - recon) if need[5] else None
            return (None, *(g_loss * g for g in saved[7:]), None, None, None, g_target)[:given]
        # anything else than d(loss): autograd on the definition (slower, rarely needed)
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(n) for t, n in zip(saved[:6], need)]
            outputs = _reference(*inputs[:5], ctx.l1, ctx.subtract_b_dec,
                                 target=inputs[5] if ctx.has_target else inputs[0])
            wanted = [t for t, n in zip(inputs, need) if n]
            grads = iter(torch.autograd.grad(outputs, wanted, (g_loss, g_recon, g_mse, g_l1), allow_unused=True))
        out = [next(grads) if n else None for n in need]
        out = [torch.zeros_like(t) if g is None and n else g for g, t, n in zip(out, saved[:6], need)]
        return (*out[:5], None, None, None, out[5])[:given]


class ReLUSAE(SparseAutoencoder):
    """f = ReLU(x W_enc + b_enc), trained with MSE + λ Σ_i f_i ‖W_dec[i]‖; decoder norms unconstrained."""

    arch = "relu"
    decoder_constrained = False

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return torch.relu(self.pre_acts(x))

    def training_forward(
        self,
        x: Float[Tensor, "batch d_in"],
        *,
        target: Float[Tensor, "batch d_in"] | None = None,
        sparsity_coefficient: float | None = None,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> TrainOutput:
        l1 = self.cfg.l1_coefficient if sparsity_coefficient is None else float(sparsity_coefficient)
        params = (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        want_grads = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        loss, recon, mse, l1_term, l0_count, f_colsum = _ReLUSAELoss.apply(
            x, *params, l1, self.cfg.subtract_b_dec, want_grads, target)
        return TrainOutput(
            recon=recon, loss=loss, mse=mse, sparsity_loss=l1_term, aux_loss=torch.zeros((), device=x.device),
            l0=l0_count / x.shape[0], fired=f_colsum > 0,
        )
