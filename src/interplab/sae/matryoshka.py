"""Matryoshka SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka Sparse Autoencoders").

A BatchTopK SAE whose first m_1 < m_2 < ... < m_L = d_sae latents must each reconstruct the input on their own:

    f                = BatchTopK(ReLU((x − b_dec) @ W_enc + b_enc))        (as BatchTopKSAE)
    x̂^(ℓ)            = f[:, :m_ℓ] @ W_dec[:m_ℓ] + b_dec                     ℓ = 1..L (x̂^(L) = x̂)
    L                = Σ_ℓ mean_b ‖x_b − x̂^(ℓ)_b‖² + α · AuxK               (AuxK on the full residual)

`TrainOutput.mse` reports the full reconstruction's term (ℓ = L); `loss` holds the sum over all prefixes. Early
latents are pushed towards general, frequently useful directions, which reduces feature absorption.

The nested reconstructions cost one sparse decode in total: each active (token, latent) pair belongs to exactly
one level, so decoding with bags (level, token) gives the per-level contributions d^(ℓ) [L, batch, d_in] at once,
and x̂^(ℓ) = b_dec + Σ_{ℓ' ≤ ℓ} d^(ℓ') is a cumulative sum over levels. Inference and saving are BatchTopK's
(saved as a JumpReLU).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interplab.sae.base import TrainOutput
from interplab.sae.batchtopk import BatchTopKSAE
from interplab.sae.kernels import SparseCodes, sparse_decode


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK SAE trained on the summed reconstruction losses of nested prefixes of its dictionary."""

    arch = "matryoshka"

    def level_of_latent(self) -> Tensor:
        """[d_sae] index ℓ of the prefix level each latent first belongs to."""
        bounds = torch.tensor(self.cfg.prefixes, device=self.W_dec.device)
        return torch.bucketize(torch.arange(self.cfg.d_sae, device=bounds.device), bounds, right=True)

    def nested_recons(self, f: Float[Tensor, " nnz"], codes: SparseCodes) -> Float[Tensor, "level batch d_in"]:
        """x̂^(ℓ) for every level ℓ, from the active pairs of the batch."""
        n_levels = len(self.cfg.prefixes)
        bags = self.level_of_latent()[codes.cols] * codes.batch + codes.rows      # [nnz] bag (level, token)
        level_codes, order = SparseCodes.from_rows_cols(bags, codes.cols, n_levels * codes.batch, codes.d_sae)
        parts = sparse_decode(f[order], self.W_dec, level_codes)                # [level·batch d_in]
        parts = parts.view(n_levels, codes.batch, -1)                           # d^(ℓ)
        return parts.cumsum(0) + self.b_dec                                     # [level batch d_in]

    def training_forward(
        self,
        x: Float[Tensor, "batch d_in"],
        *,
        target: Float[Tensor, "batch d_in"] | None = None,
        sparsity_coefficient: float | None = None,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> TrainOutput:
        """Σ over prefixes of the MSE against `target` (default x), plus AuxK; `sparsity_coefficient` is ignored."""
        y = x if target is None else target
        x_in, sel, f = self._sparse_encode(x, dead_mask)
        recons = self.nested_recons(f, sel.codes)                               # [level batch d_in]
        level_mse = (recons - y).pow(2).sum(-1).mean(-1)                        # [level]
        recon, mse = recons[-1], level_mse[-1]
        aux = self._aux_loss(x, x_in, recon, sel, y)
        l0, fired = self._stats(f, sel.codes)
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        return TrainOutput(recon=recon, loss=level_mse.sum() + aux, mse=mse, sparsity_loss=zero, aux_loss=aux,
                           l0=l0, fired=fired)
