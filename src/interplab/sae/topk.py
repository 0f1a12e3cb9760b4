"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), with the AuxK loss.

    pre = (x − b_dec) @ W_enc + b_enc                  [batch d_sae]
    f   = ReLU(TopK_k(pre))                            keep each token's k largest pre-activations (as SAELens)
    x̂   = f @ W_dec + b_dec                            W_dec rows kept at unit norm
    L   = mean_b ‖x_b − x̂_b‖² + α · AuxK

AuxK lets dead latents learn: with e = x − x̂ (detached), the aux_k largest pre-activations among dead latents
(no ReLU, as in SAELens, so that latents whose pre-activations are all negative still get a gradient) reconstruct
e without bias, ê = z_aux @ W_dec, and AuxK = mean_b ‖e_b − ê_b‖². Gao et al. write both terms as MSEs
normalised by one baseline; we keep both in SAELens's raw units (squared error summed over d_in, mean over
tokens), which weighs them in the same ratio, so α = aux_coefficient = 1/32 means what it means in the paper.

AuxK uses min(aux_k, n_dead) latents per token; Gao et al.'s aux_k = 512 is our default. (SAELens and sparsify use
d_in/2 and scale the term by min(n_dead/k_aux, 1); we do not.)

Training runs the only dense product, the encoder forward, under no_grad, block by block (selection.py), picks the
active latents, and attaches gradients to just those (kernels.sparse_encode / sparse_decode): the decoder forward
and both backward passes cost O(batch · k · d_in) instead of O(batch · d_sae · d_in). AuxK goes through the same
sparse kernels, or through four small dense products over the dead latents when there are few of them.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interplab.sae.base import SparseAutoencoder, TrainOutput
from interplab.sae.kernels import SparseCodes, dense_subset_encode, sparse_decode, sparse_encode
from interplab.sae.selection import DenseAux, Selection, encode_select


class TopKSAE(SparseAutoencoder):
    """f = ReLU(TopK_k((x − b_dec) W_enc + b_enc)); unit-norm decoder; AuxK for dead latents."""

    arch = "topk"

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        pre = self.pre_acts(x)                                       # [... d_sae]
        values, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)    # [... k]
        return torch.zeros_like(pre).scatter(-1, idx, values.relu())

    # ---- training ------------------------------------------------------------------------------------------
    def _select(self, x_in: Float[Tensor, "batch d_in"], dead_mask: Bool[Tensor, " d_sae"] | None) -> Selection:
        """The dense no-grad encoder pass: active pairs per token, and AuxK candidates among dead latents."""
        return encode_select(x_in, self.W_enc, self.b_enc, self.cfg.k, dead_mask=dead_mask, aux_k=self.cfg.aux_k)

    def _sparse_encode(self, x: Float[Tensor, "batch d_in"], dead_mask: Bool[Tensor, " d_sae"] | None,
                       ) -> tuple[Float[Tensor, "batch d_in"], Selection, Float[Tensor, " nnz"]]:
        """Dense no-grad encoder and selection, then f with gradients on the active pairs only."""
        b_dec = self.b_dec if self.cfg.subtract_b_dec else None
        with torch.no_grad():
            x_in = x - b_dec if b_dec is not None else x                     # [batch d_in]
            if dead_mask is not None:
                dead_mask = dead_mask.to(x.device)
            sel = self._select(x_in, dead_mask)                              # the only dense product
        f = sparse_encode(x, self.W_enc, self.b_enc, sel.codes, b_dec=b_dec, values=sel.values, x_in=x_in).relu()
        self._observe(f.detach())
        return x_in, sel, f                                                  # f: [nnz]

    def _observe(self, f: Float[Tensor, " nnz"]) -> None:
        """Hook for running statistics of the kept activations (BatchTopK's threshold)."""

    def _aux_loss(self, x: Float[Tensor, "batch d_in"], x_in: Float[Tensor, "batch d_in"],
                  recon: Float[Tensor, "batch d_in"], sel: Selection, target: Float[Tensor, "batch d_in"],
                  ) -> Float[Tensor, ""]:
        """α · mean_b ‖e_b − ê_b‖², e = target − x̂ detached (target = x for an SAE), ê from the top-aux_k dead
        pre-activations of the input x (0 if none dead)."""
        if sel.aux is None:
            return torch.zeros((), device=x.device, dtype=x.dtype)
        b_dec = self.b_dec if self.cfg.subtract_b_dec else None
        if isinstance(sel.aux, DenseAux):  # few dead latents: a dense block over them
            dead, values, mask = sel.aux
            z = dense_subset_encode(x_in, self.W_enc, self.b_enc, dead, values, mask, b_dec=b_dec)  # [batch n_dead]
            e_hat = z @ self.W_dec.index_select(0, dead)                     # [batch d_in], no bias
        else:
            codes, pre_vals = sel.aux
            z = sparse_encode(x, self.W_enc, self.b_enc, codes, b_dec=b_dec, values=pre_vals, x_in=x_in)  # [nnz]
            e_hat = sparse_decode(z, self.W_dec, codes)                      # [batch d_in], no bias
        e = (target - recon).detach()                                        # [batch d_in]
        return self.cfg.aux_coefficient * self._mse(e_hat, e)

    @staticmethod
    def _stats(f: Float[Tensor, " nnz"], codes: SparseCodes) -> tuple[Tensor, Tensor]:
        """(mean active latents per token, which latents fired) from the active pairs."""
        active = f.detach() > 0
        fired = torch.zeros(codes.d_sae, dtype=torch.bool, device=f.device)
        fired[codes.cols[active]] = True
        return active.sum().to(f.dtype) / codes.batch, fired

    def training_forward(
        self,
        x: Float[Tensor, "batch d_in"],
        *,
        target: Float[Tensor, "batch d_in"] | None = None,
        sparsity_coefficient: float | None = None,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> TrainOutput:
        """MSE against `target` (default x) + AuxK; `sparsity_coefficient` is ignored (k fixes the sparsity)."""
        y = x if target is None else target
        x_in, sel, f = self._sparse_encode(x, dead_mask)
        recon = sparse_decode(f, self.W_dec, sel.codes) + self.b_dec     # [batch d_in]
        mse = self._mse(recon, y)
        aux = self._aux_loss(x, x_in, recon, sel, y)
        l0, fired = self._stats(f, sel.codes)
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        return TrainOutput(recon=recon, loss=mse + aux, mse=mse, sparsity_loss=zero, aux_loss=aux, l0=l0,
                           fired=fired)
