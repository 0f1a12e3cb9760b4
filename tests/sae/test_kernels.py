"""Sparse kernels and the selection pass: equal to dense computations, gradients checked numerically, exact
batch-level selection."""

from __future__ import annotations

import pytest
import torch

from interplab.sae.kernels import SparseCodes, dense_subset_encode, sparse_decode, sparse_encode
from interplab.sae.selection import aux_codes, batchtopk_codes, encode_select, topk_codes


def _problem(batch=6, d_in=5, d_sae=11, k=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g, dtype=dtype)
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=dtype)
    b_enc = torch.randn(d_sae, generator=g, dtype=dtype)
    b_dec = torch.randn(d_in, generator=g, dtype=dtype)
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=dtype)
    pre = (x - b_dec) @ W_enc + b_enc
    codes, values = topk_codes(pre, k)
    return x, W_enc, b_enc, b_dec, W_dec, pre, codes, values


def test_sparse_codes_layout():
    idx = torch.tensor([[4, 1], [0, 4], [2, 3]])
    codes = SparseCodes.fixed_k(idx, d_sae=5)
    assert codes.rows.tolist() == [0, 0, 1, 1, 2, 2]
    assert codes.offsets.tolist() == [0, 2, 4]
    order, starts, rows = codes.by_latent()
    assert rows.tolist() == codes.rows[order].tolist()
    # latent j's pairs are order[starts[j]:starts[j+1]]: latent 0 <- pair 2, 1 <- 1, 2 <- 4, 3 <- 5, 4 <- 0 and 3
    assert starts.tolist() == [0, 1, 2, 3, 4]
    assert codes.cols[order].tolist() == [0, 1, 2, 3, 4, 4]
    dense = codes.dense(torch.arange(1.0, 7.0))
    assert dense.tolist() == [[0, 2, 0, 0, 1], [3, 0, 0, 0, 4], [0, 0, 5, 6, 0]]


def test_from_rows_cols_groups_pairs_by_token_and_handles_empty_tokens():
    rows = torch.tensor([2, 0, 2, 0])
    cols = torch.tensor([1, 3, 0, 2])
    codes, order = SparseCodes.from_rows_cols(rows, cols, batch=4, d_sae=4)
    assert codes.rows.tolist() == [0, 0, 2, 2]
    assert codes.cols.tolist() == [3, 2, 1, 0]
    assert codes.offsets.tolist() == [0, 2, 2, 4]  # token 1 and token 3 have no active latent
    assert order.tolist() == [1, 3, 0, 2]


def test_sparse_encode_equals_dense_gather():
    x, W_enc, b_enc, b_dec, _, pre, codes, values = _problem()
    got = sparse_encode(x, W_enc, b_enc, codes, b_dec=b_dec)
    torch.testing.assert_close(got, pre[codes.rows, codes.cols])
    torch.testing.assert_close(got, values)


def test_sparse_decode_equals_dense_matmul():
    x, _, _, _, W_dec, _, codes, values = _problem()
    got = sparse_decode(values, W_dec, codes)
    torch.testing.assert_close(got, codes.dense(values) @ W_dec)


def test_sparse_encode_gradcheck():
    x, W_enc, b_enc, b_dec, _, _, codes, _ = _problem()
    args = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    assert torch.autograd.gradcheck(
        lambda x, W, b, bd: sparse_encode(x, W, b, codes, b_dec=bd), args)
    assert torch.autograd.gradcheck(lambda x, W, b: sparse_encode(x, W, b, codes), args[:3])


def test_dense_subset_encode_gradcheck():
    """Values of latents [1, 4, 7] with a mask; as a function of the parameters it is (x − b_dec) W[:, S] + b[S]."""
    x, W_enc, b_enc, b_dec, _, _, _, _ = _problem()
    latents = torch.tensor([1, 4, 7])
    mask = torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) < 0.6

    def f(W, b, bd):
        values = (((x - bd) @ W + b)[:, latents] * mask).detach()  # precomputed, as in training
        out = dense_subset_encode(x - bd.detach(), W, b, latents, values, mask, b_dec=bd)
        # gradcheck perturbs inputs, so recompute values consistently: add the difference with no gradient
        return out + (((x - bd) @ W + b)[:, latents] * mask - out).detach()

    args = [t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec)]
    assert torch.autograd.gradcheck(f, args)
    out = dense_subset_encode(x - b_dec, *args[:2], latents, ((x - b_dec) @ W_enc + b_enc)[:, latents] * mask, mask,
                              b_dec=args[2])
    ref = ((x - args[2]) @ args[0] + args[1])[:, latents] * mask
    upstream = torch.randn(6, 3, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), args)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), args)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_sparse_decode_gradcheck():
    _, _, _, _, W_dec, _, codes, values = _problem()
    args = [values.clone().requires_grad_(), W_dec.clone().requires_grad_()]
    assert torch.autograd.gradcheck(lambda f, W: sparse_decode(f, W, codes), args)


def test_precomputed_values_get_the_same_gradients_as_recomputed_ones():
    x, W_enc, b_enc, b_dec, _, _, codes, values = _problem(dtype=torch.float32)
    upstream = torch.randn(codes.nnz)
    grads = []
    for given in (None, values):
        params = [t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec)]
        out = sparse_encode(x, params[0], params[1], codes, b_dec=params[2], values=given)
        out.backward(upstream)
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_topk_step_matches_dense_reference_gradients():
    """Dense reference: f = scatter(ReLU(topk(pre))); x̂ = f W_dec + b_dec; sparse path must agree in every grad."""
    x, W_enc, b_enc, b_dec, W_dec, _, _, _ = _problem(batch=16, d_in=8, d_sae=40, k=5, dtype=torch.float64)
    grads = []
    for sparse in (True, False):
        P = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
        pre = (x - P[3]) @ P[0] + P[1]
        if sparse:
            codes, vals = topk_codes(pre.detach(), 5)
            f = sparse_encode(x, P[0], P[1], codes, b_dec=P[3], values=vals).relu()
            recon = sparse_decode(f, P[2], codes) + P[3]
        else:
            v, i = pre.topk(5, dim=-1)
            recon = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ P[2] + P[3]
        ((recon - x) ** 2).sum(-1).mean().backward()
        grads.append([p.grad for p in P])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _flat_reference(pre: torch.Tensor, k: int) -> set[tuple[int, int]]:
    vals, pos = pre.relu().reshape(-1).topk(k * pre.shape[0])
    pos = pos[vals > 0]
    return {(int(p) // pre.shape[1], int(p) % pre.shape[1]) for p in pos}


@pytest.mark.parametrize("skewed", [False, True])
def test_batchtopk_codes_are_the_exact_batch_level_top(skewed):
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(32, 50, generator=g)
    if skewed:  # one token owns most of the batch's largest values: forces the candidate width to grow
        pre[7] += 10.0
    codes, values = batchtopk_codes(pre, 2)
    got = set(zip(codes.rows.tolist(), codes.cols.tolist()))
    assert got == _flat_reference(pre, 2)
    torch.testing.assert_close(values, pre[codes.rows, codes.cols])
    assert codes.rows.tolist() == sorted(codes.rows.tolist())
    if skewed:
        assert sum(1 for r, _ in got if r == 7) > 4 * 2  # more than the first candidate width


def test_batchtopk_drops_non_positive_entries():
    pre = torch.tensor([[1.0, -1.0, -2.0], [-1.0, -3.0, -0.5]])
    codes, values = batchtopk_codes(pre, 2)  # 4 slots, one positive value
    assert codes.rows.tolist() == [0] and codes.cols.tolist() == [0] and values.tolist() == [1.0]
    assert codes.offsets.tolist() == [0, 1]


def test_aux_codes_choose_only_dead_latents():
    pre = torch.tensor([[5.0, 1.0, 2.0, -1.0], [0.0, 3.0, -2.0, 4.0]])
    dead = torch.tensor([False, True, True, True])
    codes, values = aux_codes(pre, dead, aux_k=2)
    pairs = sorted(zip(codes.rows.tolist(), codes.cols.tolist(), values.tolist()))
    assert pairs == [(0, 1, 1.0), (0, 2, 2.0), (1, 1, 3.0), (1, 3, 4.0)]
    assert aux_codes(pre, torch.zeros(4, dtype=torch.bool), 2) is None
    codes, _ = aux_codes(pre, torch.tensor([False, False, False, True]), aux_k=3)  # k clipped to the dead count
    assert codes.cols.tolist() == [3, 3]


@pytest.mark.parametrize("batch_level", [False, True])
def test_blockwise_encoder_pass_equals_selection_on_the_full_pre_activations(batch_level):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 6, generator=g)
    x[5] *= 8  # one token with large pre-activations: in BatchTopK it owns more than its first candidates
    W, b = torch.randn(6, 50, generator=g), torch.randn(50, generator=g)
    dead = torch.rand(50, generator=g) < 0.3
    sel = encode_select(x, W, b, 2, batch_level=batch_level, dead_mask=dead, aux_k=3, chunk=8)
    pre = torch.addmm(b, x, W)
    codes, values = (batchtopk_codes if batch_level else topk_codes)(pre, 2)
    assert sel.codes.rows.tolist() == codes.rows.tolist() and sel.codes.offsets.tolist() == codes.offsets.tolist()
    assert sorted(zip(sel.codes.rows.tolist(), sel.codes.cols.tolist())) == sorted(
        zip(codes.rows.tolist(), codes.cols.tolist()))
    torch.testing.assert_close(sel.values, pre[sel.codes.rows, sel.codes.cols])
    aux, aux_values = aux_codes(pre, dead, 3)
    assert sorted(zip(sel.aux[0].rows.tolist(), sel.aux[0].cols.tolist())) == sorted(
        zip(aux.rows.tolist(), aux.cols.tolist()))
    torch.testing.assert_close(sel.aux[1], pre[sel.aux[0].rows, sel.aux[0].cols])
    assert encode_select(x, W, b, 2, dead_mask=torch.zeros(50, dtype=torch.bool), aux_k=3).aux is None
