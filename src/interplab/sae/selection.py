"""Choosing the active latents of a training batch: the one dense (no-grad) encoder pass of top-k style SAEs.

`encode_select` computes pre = x_in W_enc + b_enc block by block and keeps, per token, the top k (TopK) or the
candidates of the batch-level selection (BatchTopK), plus the AuxK candidates among dead latents. The kernels of
kernels.py then attach gradients to just those entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.distributed import all_gather_cat
from interplab.sae.kernels import SparseCodes

ENCODE_CHUNK = 512
"""Rows per block of the dense encoder pass: a [512, d_sae] block of pre-activations stays in cache while its top-k
is taken, and the full [batch, d_sae] matrix is never allocated (on CPU this halves the cost of the pass)."""


DENSE_AUX_RATIO = 4
"""AuxK works on the dense [batch, n_dead] block when n_dead <= DENSE_AUX_RATIO·k_aux: four matrix products over the
dead latents then cost less than the sparse kernels over batch·k_aux pairs (which are ~4x slower per element)."""


class DenseAux(NamedTuple):
    """AuxK candidates as a dense block over the dead latents."""

    dead: Int[Tensor, " n_dead"]
    """The dead latents."""
    values: Float[Tensor, "batch n_dead"]
    """Their pre-activations where chosen (each token's top k_aux), 0 elsewhere."""
    mask: Bool[Tensor, "batch n_dead"]
    """Which entries were chosen."""


class Selection(NamedTuple):
    codes: SparseCodes
    """The active (token, latent) pairs."""
    values: Float[Tensor, " nnz"]
    """Their pre-activations."""
    aux: tuple[SparseCodes, Float[Tensor, " nnz_aux"]] | DenseAux | None
    """AuxK: each token's largest pre-activations among dead latents (pairs, or a dense block when few latents are
    dead), or None when no latent is dead."""


@torch.no_grad()
def encode_select(
    x_in: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    k: int,
    *,
    batch_level: bool = False,
    batch_ranks: int = 1,
    dead_mask: Tensor | None = None,
    aux_k: int = 0,
    chunk: int = ENCODE_CHUNK,
) -> Selection:
    """The dense encoder pass pre = x_in W_enc + b_enc, block by block, keeping only what training needs.

    Per token: the top k (TopK), or the top min(d_sae, 4k) candidates for the batch-level selection (BatchTopK);
    and the top min(aux_k, n_dead) among dead latents (AuxK). `batch_ranks` > 1: `x_in` is this rank's part of a
    data-parallel batch split evenly over that many ranks, and the batch-level selection is over the whole batch.
    """
    batch, d_sae = x_in.shape[0], W_enc.shape[1]
    width = min(d_sae, 4 * k) if batch_level else k
    vals = x_in.new_empty(batch, width)
    idx = torch.empty(batch, width, dtype=torch.long, device=x_in.device)
    dead = dead_mask.nonzero().flatten() if dead_mask is not None else idx.new_empty(0)
    k_aux = min(aux_k, dead.numel())
    dense_aux = 0 < dead.numel() <= DENSE_AUX_RATIO * k_aux
    if dense_aux:
        aux_block = x_in.new_empty(batch, dead.numel())
        aux_mask = torch.ones(batch, dead.numel(), dtype=torch.bool, device=x_in.device)
    elif k_aux:
        aux_vals, aux_idx = x_in.new_empty(batch, k_aux), idx.new_empty(batch, k_aux)
    block = x_in.new_empty(min(chunk, batch), d_sae)
    for start in range(0, batch, chunk):
        end = min(start + chunk, batch)
        pre = torch.addmm(b_enc, x_in[start:end], W_enc, out=block[: end - start])    # [chunk d_sae]
        torch.topk(pre, width, dim=-1, sorted=False, out=(vals[start:end], idx[start:end]))
        if dense_aux:
            block_aux = torch.index_select(pre, 1, dead, out=aux_block[start:end])     # [chunk n_dead]
            if k_aux < dead.numel():  # keep each token's top k_aux
                smallest = block_aux.topk(dead.numel() - k_aux, dim=-1, largest=False, sorted=False).indices
                aux_mask[start:end].scatter_(1, smallest, False)
                block_aux.masked_fill_(~aux_mask[start:end], 0.0)
        elif k_aux:
            torch.topk(pre.index_select(1, dead), k_aux, dim=-1, sorted=False,
                       out=(aux_vals[start:end], aux_idx[start:end]))
    if batch_level:
        codes, values = _batch_level(vals, idx, k, d_sae, lambda rows: torch.addmm(b_enc, x_in[rows], W_enc),
                                     batch_ranks=batch_ranks)
    else:
        codes, values = SparseCodes.fixed_k(idx, d_sae), vals.reshape(-1)
    if dense_aux:
        aux: tuple[SparseCodes, Float[Tensor, " nnz_aux"]] | DenseAux | None = DenseAux(dead, aux_block, aux_mask)
    else:
        aux = (SparseCodes.fixed_k(dead[aux_idx], d_sae), aux_vals.reshape(-1)) if k_aux else None
    return Selection(codes, values, aux)


def _batch_level(cand_vals: Float[Tensor, "batch c"], cand_idx: Int[Tensor, "batch c"], k: int, d_sae: int,
                 pre_rows: Callable[[Tensor], Tensor], batch_ranks: int = 1,
                 ) -> tuple[SparseCodes, Float[Tensor, " nnz"]]:
    """The k·batch largest positive pre-activations of the batch, from each token's top candidates.

    A token whose candidates were all chosen might own more of the batch's top entries: its candidate list is
    widened (pre-activations recomputed for those tokens only by `pre_rows`) and the selection repeated. Every
    other token had a candidate left out, so nothing below its candidates can be chosen: the result is exact.

    Data-parallel (`batch_ranks` = R > 1, the batch split evenly over R ranks): n = k·batch·R entries are chosen
    over all ranks. The global top n lies within the union of each rank's local top n, so each rank selects its
    local top n as above, the ranks exchange those values (R·n floats), and each keeps its entries at or above
    the n-th largest of them. Ties at that threshold (measure zero for real-valued activations) keep all tied.
    """
    batch, c = cand_vals.shape
    n = k * batch * batch_ranks
    cand_v, cand_c = cand_vals.reshape(-1), cand_idx.reshape(-1)
    cand_r = torch.arange(batch, device=cand_v.device).repeat_interleave(c)
    width = torch.full((batch,), c, device=cand_v.device)
    while True:
        top_v, top_p = cand_v.topk(min(n, cand_v.numel()), sorted=False)
        chosen = torch.bincount(cand_r[top_p], minlength=batch)
        saturated = ((chosen == width) & (width < d_sae)).nonzero().flatten()
        if saturated.numel() == 0:
            break
        wider = min(d_sae, 2 * int(width[saturated].max()))
        v, i = pre_rows(saturated).topk(wider, dim=-1, sorted=False)          # [n_saturated wider]
        keep = ~torch.isin(cand_r, saturated)
        cand_v = torch.cat([cand_v[keep], v.reshape(-1)])
        cand_c = torch.cat([cand_c[keep], i.reshape(-1)])
        cand_r = torch.cat([cand_r[keep], saturated.repeat_interleave(wider)])
        width[saturated] = wider
    keep = top_v > 0
    if batch_ranks > 1:
        keep &= top_v >= _threshold_over_ranks(top_v, n)
    top_v, top_p = top_v[keep], top_p[keep]
    codes, order = SparseCodes.from_rows_cols(cand_r.index_select(0, top_p), cand_c.index_select(0, top_p),
                                              batch, d_sae)
    return codes, top_v.index_select(0, order)


def _threshold_over_ranks(local_top: Float[Tensor, " m"], n: int) -> Tensor:
    """The n-th largest value among every rank's `local_top` (each rank's top m <= n values)."""
    padded = local_top.new_full((n,), float("-inf"))
    padded[: local_top.numel()] = local_top
    return all_gather_cat(padded).topk(n, sorted=False).values.min()


@torch.no_grad()
def topk_codes(pre: Float[Tensor, "batch d_sae"], k: int) -> tuple[SparseCodes, Float[Tensor, " nnz"]]:
    """The k largest pre-activations of every token (ties broken by torch.topk): codes and their values."""
    values, idx = pre.topk(k, dim=-1, sorted=False)  # [batch k]
    return SparseCodes.fixed_k(idx, pre.shape[1]), values.reshape(-1)


@torch.no_grad()
def batchtopk_codes(pre: Float[Tensor, "batch d_sae"], k: int) -> tuple[SparseCodes, Float[Tensor, " nnz"]]:
    """The k·batch largest positive entries of the whole batch (Bussmann et al. 2024), exact.

    Avoids a top-k over all batch·d_sae entries: each token proposes its top 4k candidates and the batch-level
    selection runs over those (see `_batch_level`).
    """
    vals, idx = pre.topk(min(pre.shape[1], 4 * k), dim=-1, sorted=False)
    return _batch_level(vals, idx, k, pre.shape[1], lambda rows: pre[rows])


@torch.no_grad()
def aux_codes(pre: Float[Tensor, "batch d_sae"], dead_mask: Tensor, aux_k: int,
              ) -> tuple[SparseCodes, Float[Tensor, " nnz"]] | None:
    """For AuxK: each token's min(aux_k, n_dead) largest pre-activations among dead latents (None if none is dead)."""
    dead = dead_mask.nonzero().flatten()  # [n_dead]
    if dead.numel() == 0:
        return None
    k = min(aux_k, dead.numel())
    values, idx = pre.index_select(1, dead).topk(k, dim=-1, sorted=False)  # [batch k]
    return SparseCodes.fixed_k(dead[idx], pre.shape[1]), values.reshape(-1)
