"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"), trained with an L0 penalty through a straight-through
estimator.

    pre = x @ W_enc + b_enc                     (x − b_dec if cfg.apply_b_dec_to_input; default: not subtracted)
    θ   = exp(log_threshold)                    [d_sae], one threshold per latent, positive by construction
    f   = pre · H(pre − θ)                      H = Heaviside step (written ReLU(pre)·1[pre > θ], as SAELens)
    x̂   = f @ W_dec + b_dec                     W_dec rows kept at unit norm
    L   = mean_b ‖x_b − x̂_b‖² + λ₀ · mean_b Σ_i H(pre_bi − θ_i)

H has zero derivative almost everywhere, so θ would get no gradient. The paper's pseudo-derivatives, with the
rectangle kernel K(u) = 1[|u| < 1/2] of width ε = cfg.jumprelu_bandwidth, are

    ∂f/∂θ  = −(θ/ε) K((pre − θ)/ε)         ∂H(pre − θ)/∂θ = −(1/ε) K((pre − θ)/ε)

and ∂f/∂pre = H(pre − θ) as usual; the L0 term sends no gradient to pre (DeepMind's choice). Through
θ = exp(log_threshold), ∂/∂log_threshold = θ · ∂/∂θ.

The training step is fused like the ReLU SAE's (relu.py): five matrix products over blocks of tokens, gradients
accumulated during the forward pass (the loss is a sum over tokens), no [batch, d_sae] tensor, and the gate and
kernel window computed with sign/relu arithmetic rather than comparisons (much faster on CPU). Backpropagating
anything but `loss` falls back to plain autograd through `_JumpReLUWithL0`, which is also the reference the tests
compare with.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from interplab.sae.base import SparseAutoencoder, TrainOutput
from interplab.sae.config import SAEConfig


class _JumpReLUWithL0(torch.autograd.Function):
    """(f, l0_per_token) = (pre · H(pre − θ), Σ_i H(pre_i − θ_i)) with the rectangle-kernel STE for θ."""

    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
        active = pre > threshold                                     # [batch d_sae]
        f = pre * active
        l0 = active.sum(-1, dtype=pre.dtype)                         # [batch]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return f, l0

    @staticmethod
    def backward(ctx: FunctionCtx, g_f: Tensor, g_l0: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = g_f * (pre > threshold) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            window = ((pre - threshold).abs() < eps / 2).to(pre.dtype)                 # K((pre − θ)/ε)
            # Σ_b K_bi · (θ_i g_f,bi + g_l0,b), times −1/ε
            grad_threshold = -(threshold * (window * g_f).sum(0) + g_l0 @ window) / eps   # [d_sae]
        return grad_pre, grad_threshold, None


JUMPRELU_CHUNK = 512
"""Tokens per block of the fused JumpReLU step."""


def _reference(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, log_threshold: Tensor,
               l0_coef: float, bandwidth: float, subtract_b_dec: bool, target: Tensor | None = None,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, recon, mse, sparsity) of reconstructing `target` (default x) from x, with plain autograd and the STE
    function: the definition, and the fallback."""
    target = x if target is None else target
    pre = (x - b_dec if subtract_b_dec else x) @ W_enc + b_enc                # [batch d_sae]
    f, l0_per_token = _JumpReLUWithL0.apply(pre, log_threshold.exp(), bandwidth)
    recon = f @ W_dec + b_dec
    mse = (recon - target).pow(2).sum(-1).mean()
    sparsity = l0_coef * l0_per_token.mean()
    return mse + sparsity, recon, mse, sparsity


class _JumpReLULoss(torch.autograd.Function):
    """(loss, recon, mse, sparsity, l0, fired) of a batch reconstructing `target` (x for an SAE) from x; parameter
    gradients accumulated block by block."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, target: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                log_threshold: Tensor, l0_coef: float, bandwidth: float, subtract_b_dec: bool, want_grads: bool,
                ) -> tuple[Tensor, ...]:
        batch, d_sae = x.shape[0], W_enc.shape[1]
        theta = log_threshold.exp()                                             # [d_sae]
        x_in = x - b_dec if subtract_b_dec else x                               # [batch d_in]
        recon = torch.empty_like(x)
        sq_err, active_per_latent = x.new_zeros(()), x.new_zeros(d_sae)
        f_blk, gate_blk, window_blk = (x.new_empty(min(JUMPRELU_CHUNK, batch), d_sae) for _ in range(3))
        if want_grads:
            grad_blk = torch.empty_like(f_blk)
            g_W_enc, g_b_enc = torch.zeros_like(W_enc), torch.zeros_like(b_enc)
            g_W_dec, g_b_dec = torch.zeros_like(W_dec), torch.zeros_like(b_dec)
            window_g, window_n = x.new_zeros(d_sae), x.new_zeros(d_sae)       # Σ_b K·∂L/∂f and Σ_b K
        for start in range(0, batch, JUMPRELU_CHUNK):
            end = min(start + JUMPRELU_CHUNK, batch)
            n, xb = end - start, x_in[start:end]
            f = torch.addmm(b_enc, xb, W_enc, out=f_blk[:n])                    # matmul 1: pre [block d_sae]
            gate = torch.sub(f, theta, out=gate_blk[:n])                        # pre − θ
            if want_grads:  # K((pre − θ)/ε) = 1[|pre − θ| < ε/2]
                window = torch.abs(gate, out=window_blk[:n]).neg_().add_(bandwidth / 2).sign_().relu_()
            gate.sign_().relu_()                                                # H(pre − θ)
            f.mul_(gate)                                                        # f = pre · H(pre − θ)
            active_per_latent += gate.sum(0)
            r = torch.addmm(b_dec, f, W_dec, out=recon[start:end])             # matmul 2 [block d_in]
            diff = r - target[start:end]
            sq_err += diff.pow(2).sum()
            if want_grads:
                gr = diff.mul_(2.0 / batch)                                     # ∂mse/∂x̂
                g_W_dec.addmm_(f.T, gr)                                         # matmul 3
                g_b_dec += gr.sum(0)
                g_f = torch.mm(gr, W_dec.T, out=grad_blk[:n])                   # matmul 4: ∂L/∂f [block d_sae]
                window_n += window.sum(0)
                window_g += window.mul_(g_f).sum(0)
                g_f.mul_(gate)                                                  # ∂L/∂pre = ∂L/∂f · H
                g_W_enc.addmm_(xb.T, g_f)                                       # matmul 5
                g_b_enc += g_f.sum(0)
        mse = sq_err / batch
        l0 = active_per_latent.sum() / batch
        sparsity = l0_coef * l0
        saved: tuple[Tensor, ...] = ()
        if want_grads:
            # ∂L/∂θ = Σ_b K · (−(θ/ε) ∂L/∂f − λ₀/(B ε)); ∂L/∂log θ = θ · ∂L/∂θ
            g_log_threshold = theta * (-(theta * window_g) - (l0_coef / batch) * window_n) / bandwidth
            if subtract_b_dec:
                g_b_dec -= W_enc @ g_b_enc
            saved = (g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_log_threshold)
        ctx.save_for_backward(x, target, W_enc, b_enc, W_dec, b_dec, log_threshold, recon, *saved)
        ctx.args = (l0_coef, bandwidth, subtract_b_dec)
        ctx.want_grads = want_grads
        fired = active_per_latent > 0
        ctx.mark_non_differentiable(l0, fired)
        return mse + sparsity, recon, mse, sparsity, l0, fired

    @staticmethod
    def backward(ctx: FunctionCtx, g_loss: Tensor, g_recon: Tensor, g_mse: Tensor, g_sparsity: Tensor, *_: Tensor,
                 ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        no_extra = [None] * 4
        if ctx.want_grads and not ctx.needs_input_grad[0] and not g_mse.any() and not g_sparsity.any() \
                and not g_recon.any():
            target, recon = saved[1], saved[7]  # ∂loss/∂target = (2/B)(target − recon)
            g_target = g_loss * (2.0 / len(target)) * (target - recon) if ctx.needs_input_grad[1] else None
            return (None, g_target, *(g_loss * g for g in saved[8:]), *no_extra)
        with torch.enable_grad():  # anything else than d(loss): autograd on the definition
            inputs = [t.detach().requires_grad_(need) for t, need in zip(saved[:7], ctx.needs_input_grad)]
            outputs = _reference(inputs[0], *inputs[2:], *ctx.args, target=inputs[1])
            wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
            grads = iter(torch.autograd.grad(outputs, wanted, (g_loss, g_recon, g_mse, g_sparsity),
                                             allow_unused=True))
        out = [next(grads) if need else None for need in ctx.needs_input_grad[:7]]
        return (*[torch.zeros_like(t) if g is None and need else g
                  for g, t, need in zip(out, saved[:7], ctx.needs_input_grad)], *no_extra)


class JumpReLUSAE(SparseAutoencoder):
    """f = pre · H(pre − θ) with learned per-latent thresholds θ = exp(log_threshold); L0 penalty."""

    arch = "jumprelu"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    @property
    def threshold(self) -> Float[Tensor, " d_sae"]:
        """θ = exp(log_threshold), the per-latent threshold (the `threshold` tensor of SAELens files)."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def set_threshold(self, threshold: Float[Tensor, " d_sae"]) -> None:
        """Set θ (e.g. from a file) so that `self.threshold` reproduces it bit for bit where possible.

        log θ is rounded to the nearest float and then moved by a few ulps, if needed, until exp gives back θ
        exactly (such a value exists for every θ that was itself computed as exp of a float, as in our files).
        Thresholds ≤ 0 become 1e-30, which gates ReLU outputs identically for all practical purposes.
        """
        target = threshold.to(self.log_threshold).clamp_min(1e-30)
        guess = target.double().log().to(target.dtype)
        best, found = guess.clone(), guess.exp() == target
        for direction in (math.inf, -math.inf):
            candidate = guess
            for _ in range(4):
                candidate = torch.nextafter(candidate, torch.full_like(candidate, direction))
                hit = ~found & (candidate.exp() == target)
                best[hit], found = candidate[hit], found | hit
        self.log_threshold.copy_(best)

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        pre = self.pre_acts(x)                                       # [... d_sae]
        return pre.relu() * (pre > self.threshold)

    @torch.no_grad()
    def initialize(self, sample: Float[Tensor, "n d_in"], *, b_dec_init: str = "mean", seed: int = 0) -> None:
        super().initialize(sample, b_dec_init=b_dec_init, seed=seed)
        self.log_threshold.fill_(math.log(self.cfg.jumprelu_init_threshold))

    def training_forward(
        self,
        x: Float[Tensor, "batch d_in"],
        *,
        target: Float[Tensor, "batch d_in"] | None = None,
        sparsity_coefficient: float | None = None,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> TrainOutput:
        """MSE + λ₀ · mean L0 (λ₀ = `sparsity_coefficient` or cfg.l0_coefficient); no auxiliary loss."""
        l0_coef = self.cfg.l0_coefficient if sparsity_coefficient is None else float(sparsity_coefficient)
        params = (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.log_threshold)
        want_grads = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        loss, recon, mse, sparsity, l0, fired = _JumpReLULoss.apply(
            x, x if target is None else target, *params, l0_coef, self.cfg.jumprelu_bandwidth, self.cfg.subtract_b_dec, want_grads)
        return TrainOutput(recon=recon, loss=loss, mse=mse, sparsity_loss=sparsity,
                           aux_loss=torch.zeros((), device=x.device, dtype=x.dtype), l0=l0, fired=fired)
