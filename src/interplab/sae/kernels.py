"""Sparse kernels for top-k style dictionaries: only the encoder forward is dense.

A training step of a TopK SAE needs the dense pre-activations once, to choose the active latents. Everything
after that touches only the `nnz` (token, latent) pairs that were chosen, kept in a CSR-like layout grouped by
token (`SparseCodes`):

    values_n = x_in[rows_n] · W_enc[:, cols_n] + b_enc[cols_n]          (sparse_encode, n = 1..nnz)
    x̂_b      = Σ_{n: rows_n = b} f_n W_dec[cols_n]                      (sparse_decode; the caller adds b_dec)

and their backward passes cost O(nnz · d_in) instead of O(batch · d_sae · d_in):

    ∂L/∂W_enc[:, j] = Σ_{n: cols_n = j} g_n x_in[rows_n]      ∂L/∂b_enc[j] = Σ_{n: cols_n = j} g_n
    ∂L/∂b_dec       = −W_enc ∂L/∂b_enc                         (when the encoder reads x − b_dec)
    ∂L/∂f_n         = ∂L/∂x̂[rows_n] · W_dec[cols_n]           ∂L/∂W_dec[j]  = Σ_{n: cols_n = j} f_n ∂L/∂x̂[rows_n]

The sums over `cols_n = j` are `embedding_bag` calls over the pairs re-sorted by latent (one stable sort per batch,
shared by the encoder and decoder backward passes), so no [nnz, d_in] tensor is ever materialised.

`dense_subset_encode` is the dense counterpart for a small set of latents (AuxK with few dead latents), where four
matrix products over the subset beat the sparse kernels. selection.py chooses the pairs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.autograd.function import FunctionCtx


def _argsort(keys: Int[Tensor, " n"], bound: int) -> Int[Tensor, " n"]:
    """Stable argsort of keys in [0, bound). On CPU numpy's radix sort (for keys that fit 16 bits) is ~100x faster
    than torch.sort on int64, and its merge sort still ~10x."""
    if keys.device.type != "cpu":
        return torch.argsort(keys, stable=True)
    small = keys.numpy().astype(np.uint16 if bound <= 1 << 16 else np.int64)
    return torch.from_numpy(np.argsort(small, kind="stable"))


def _starts(keys_sorted_counts: Int[Tensor, " m"]) -> Int[Tensor, " m"]:
    """Exclusive cumulative sum: where each group starts, given group sizes."""
    starts = torch.zeros_like(keys_sorted_counts)
    if len(starts) > 1:
        torch.cumsum(keys_sorted_counts[:-1], 0, out=starts[1:])
    return starts


class SparseCodes:
    """The active (token, latent) pairs of a batch, grouped by token.

    `cols[offsets[b] : offsets[b+1]]` are the latents active on token b and `rows` repeats b as often; the
    latent-sorted view used by the backward passes is computed on first use and cached.
    """

    __slots__ = ("rows", "cols", "offsets", "batch", "d_sae", "_by_latent")

    def __init__(self, rows: Int[Tensor, " nnz"], cols: Int[Tensor, " nnz"], offsets: Int[Tensor, " batch"],
                 batch: int, d_sae: int):
        self.rows, self.cols, self.offsets = rows, cols, offsets
        self.batch, self.d_sae = batch, d_sae
        self._by_latent: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_rows_cols(cls, rows: Int[Tensor, " nnz"], cols: Int[Tensor, " nnz"], batch: int, d_sae: int,
                       ) -> tuple["SparseCodes", Int[Tensor, " nnz"]]:
        """Codes from unordered pairs; also returns the permutation that grouped them by token."""
        order = _argsort(rows, batch)
        rows, cols = rows.index_select(0, order), cols.index_select(0, order)
        counts = torch.bincount(rows, minlength=batch)
        return cls(rows, cols, _starts(counts), batch, d_sae), order

    @classmethod
    def fixed_k(cls, idx: Int[Tensor, "batch k"], d_sae: int) -> "SparseCodes":
        """Codes with exactly k latents per token (TopK): idx[b] are token b's latents."""
        batch, k = idx.shape
        rows = torch.arange(batch, device=idx.device).repeat_interleave(k)
        offsets = torch.arange(0, batch * k, k, device=idx.device)
        return cls(rows, idx.reshape(-1), offsets, batch, d_sae)

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    def by_latent(self) -> tuple[Int[Tensor, " nnz"], Int[Tensor, " d_sae"], Int[Tensor, " nnz"]]:
        """(order, starts, rows[order]): `order` sorts the pairs by latent, latent j's pairs are
        order[starts[j]:starts[j+1]], and their tokens rows[order][starts[j]:starts[j+1]]."""
        if self._by_latent is None:
            order = _argsort(self.cols, self.d_sae)
            counts = torch.bincount(self.cols, minlength=self.d_sae)
            self._by_latent = (order, _starts(counts), self.rows.index_select(0, order))
        return self._by_latent

    def dense(self, values: Float[Tensor, " nnz"]) -> Float[Tensor, "batch d_sae"]:
        """The [batch, d_sae] matrix with `values` at the active pairs (for tests and small batches)."""
        out = values.new_zeros(self.batch, self.d_sae)
        out[self.rows, self.cols] = values
        return out


def _latent_sums(codes: SparseCodes, weights: Float[Tensor, " nnz"], vectors: Float[Tensor, "batch d"],
                 ) -> Float[Tensor, "d_sae d"]:
    """out[j] = Σ_{n: cols_n = j} weights_n · vectors[rows_n], without materialising [nnz, d]."""
    order, starts, rows = codes.by_latent()
    return F.embedding_bag(rows, vectors, starts, mode="sum", per_sample_weights=weights.index_select(0, order))


def _row_dots(codes: SparseCodes, grad: Float[Tensor, "batch d"], W: Float[Tensor, "d_sae d"]) -> Float[Tensor, " nnz"]:
    """out_n = grad[rows_n] · W[cols_n]: the gradient of an embedding_bag w.r.t. its per-sample weights."""
    try:
        # mode 0 = sum, padding_idx -1 = none; the same fused kernel autograd uses for embedding_bag
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad, W, codes.cols, codes.offsets, codes.rows, 0, -1)
    except (RuntimeError, AttributeError):  # pragma: no cover - private op missing in some future torch
        out = grad.new_empty(codes.nnz)
        for s in range(0, codes.nnz, 4096):
            rows, cols = codes.rows[s:s + 4096], codes.cols[s:s + 4096]
            out[s:s + 4096] = (grad.index_select(0, rows) * W.index_select(0, cols)).sum(-1)
        return out


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, codes: SparseCodes,
                values: Tensor | None, x_in: Tensor | None) -> Tensor:
        if x_in is None:
            x_in = x - b_dec if b_dec is not None else x  # [batch d_in]
        if values is None:  # reference computation: one dot product per active pair
            values = (x_in[codes.rows] * W_enc.T[codes.cols]).sum(-1) + b_enc[codes.cols]
        else:
            values = values.clone()
        ctx.codes = codes
        ctx.has_b_dec = b_dec is not None
        ctx.save_for_backward(x_in, W_enc)
        return values  # [nnz]

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:
        x_in, W_enc = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        g = g.contiguous()
        need_x, need_bdec, need_W, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_bdec = grad_W = grad_b = None
        if need_W:
            grad_W = _latent_sums(codes, g, x_in).T  # [d_in d_sae] (a transposed view; autograd lays it out)
        if need_b or need_bdec:
            grad_b = torch.zeros(codes.d_sae, dtype=g.dtype, device=g.device).index_add_(0, codes.cols, g)
        if need_x or need_bdec:
            if need_x:
                grad_x = F.embedding_bag(codes.cols, W_enc.T.contiguous(), codes.offsets, mode="sum",
                                         per_sample_weights=g)  # [batch d_in]
            if need_bdec:
                grad_bdec = -(W_enc @ grad_b)  # = −Σ_b grad_x[b], without forming grad_x
        return grad_x, grad_bdec, grad_W, grad_b if need_b else None, None, None, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, f: Tensor, W_dec: Tensor, codes: SparseCodes) -> Tensor:
        ctx.codes = codes
        ctx.save_for_backward(f, W_dec)
        return F.embedding_bag(codes.cols, W_dec, codes.offsets, mode="sum", per_sample_weights=f)  # [batch d_in]

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:
        f, W_dec = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        g = g.contiguous()
        grad_f = _row_dots(codes, g, W_dec) if ctx.needs_input_grad[0] else None
        grad_W = _latent_sums(codes, f, g) if ctx.needs_input_grad[1] else None
        return grad_f, grad_W, None


def sparse_encode(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    codes: SparseCodes,
    *,
    b_dec: Float[Tensor, " d_in"] | None = None,
    values: Float[Tensor, " nnz"] | None = None,
    x_in: Float[Tensor, "batch d_in"] | None = None,
) -> Float[Tensor, " nnz"]:
    """Pre-activations of the active pairs, (x − b_dec)[rows] · W_enc[:, cols] + b_enc[cols], with sparse gradients.

    Pass `values` when they are already known from the dense no-grad pass (they are then not recomputed; the
    function only attaches the gradient), and `x_in` = x − b_dec if already computed. `b_dec=None` means the
    encoder reads x itself.
    """
    return _SparseEncode.apply(x, b_dec, W_enc, b_enc, codes, values, x_in)


def sparse_decode(
    f: Float[Tensor, " nnz"], W_dec: Float[Tensor, "d_sae d_in"], codes: SparseCodes
) -> Float[Tensor, "batch d_in"]:
    """Σ_{n in token b} f_n W_dec[cols_n] for every token b (no bias), with sparse gradients."""
    return _SparseDecode.apply(f, W_dec, codes)


class _DenseSubsetEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x_in: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, latents: Tensor,
                values: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(x_in, W_enc, latents, mask)
        ctx.has_b_dec = b_dec is not None
        return values.clone()  # [batch n]

    @staticmethod
    def backward(ctx: FunctionCtx, g: Tensor) -> tuple[Tensor | None, ...]:
        x_in, W_enc, latents, mask = ctx.saved_tensors
        g = g * mask                                                          # only the chosen entries
        g_b_sub = g.sum(0)                                                    # [n]
        grad_W = grad_b = grad_bdec = None
        if ctx.needs_input_grad[2]:
            grad_W = torch.zeros_like(W_enc).index_copy_(1, latents, x_in.T @ g)
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_copy_(0, latents, g_b_sub)
        if ctx.needs_input_grad[1]:
            grad_bdec = -(W_enc.index_select(1, latents) @ g_b_sub)
        return None, grad_bdec, grad_W, grad_b, None, None, None


def dense_subset_encode(
    x_in: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    latents: Int[Tensor, " n"],
    values: Float[Tensor, "batch n"],
    mask: Bool[Tensor, "batch n"],
    *,
    b_dec: Float[Tensor, " d_in"] | None = None,
) -> Float[Tensor, "batch n"]:
    """Precomputed pre-activations `values` = x_in W_enc[:, latents] + b_enc[latents] (x_in = x − b_dec when b_dec
    is given), with their gradient attached on the entries in `mask` (the rest must be 0 and get no gradient)."""
    return _DenseSubsetEncode.apply(x_in, b_dec, W_enc, b_enc, latents, values, mask)
