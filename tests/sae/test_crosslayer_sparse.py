"""The sparse TopK training path of `CrossLayerTranscoder` against dense products, and its AuxK loss by hand."""

from __future__ import annotations

import torch

from interplab.sae.crosslayer import CrossLayerTranscoder


def random_clt_and_rows(seed: int = 0, L: int = 3, d: int = 6, F: int = 20, n: int = 40, k: int = 4):
    """A float64 topk CLT with random biases, and random inputs and targets for it."""
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(L, d, F, activation="topk", k=k, seed=seed).double()
    with torch.no_grad():
        clt.b_enc.copy_(torch.randn(L, F, generator=g, dtype=torch.float64) * 0.3)
        clt.b_dec.copy_(torch.randn(L, d, generator=g, dtype=torch.float64))
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(L)]
    ys = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(L)]
    return clt, xs, ys


def grads(clt: CrossLayerTranscoder, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    clt.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in clt.named_parameters()}


def test_sparse_topk_step_equals_the_dense_one():
    """Loss, its parts and every parameter's gradient are those of the dense reference (scatter, dense matmuls)."""
    clt, xs, ys = random_clt_and_rows()
    sparse = clt.training_loss(xs, ys, sparse=True)
    g_sparse = grads(clt, sparse.loss)
    dense = clt.training_loss(xs, ys, sparse=False)
    g_dense = grads(clt, dense.loss)
    for a, b in zip(sparse[:-1], dense[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(sparse.fired, dense.fired)
    assert sorted(g_sparse) == sorted(g_dense)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-10, atol=1e-12, msg=name)
    # and the dense forward is the module's own forward
    preds = clt(xs)
    expected = sum(((p - y) ** 2).sum(-1).mean() for p, y in zip(preds, ys))
    torch.testing.assert_close(dense.mse, expected.detach(), rtol=1e-12, atol=0)


def test_auxk_by_hand():
    """AuxK = Σ_i mean_b ‖e_i − ê_i‖²: e_i the residuals of layers i.. concatenated, ê_i = z_i W_dec[i][dead]
    from the top aux_k pre-activations (no ReLU) of layer i's dead features; times the coefficient. With 3 dead
    features and aux_k 2 the dense-block path runs, with 12 dead and aux_k 2 the sparse one."""
    for n_dead in (3, 12):
        clt, xs, ys = random_clt_and_rows(seed=n_dead)
        dead = torch.zeros(3, 20, dtype=torch.bool)
        dead[:, :n_dead] = True
        out = clt.training_loss(xs, ys, dead_mask=dead, aux_k=2, aux_coefficient=0.5)
        with torch.no_grad():
            preds = clt(xs)
            errors = [y - p for y, p in zip(ys, preds)]
            expected = 0.0
            for i, x in enumerate(xs):
                pre = clt.pre_acts(i, x)[:, :n_dead]                       # the dead features' pre-activations
                vals, idx = pre.topk(2, dim=-1)
                z = torch.zeros_like(pre).scatter(-1, idx, vals)          # no ReLU
                e_hat = z @ clt.W_dec[i][:n_dead].flatten(1)
                e = torch.cat(errors[i:], dim=-1)
                expected += ((e - e_hat) ** 2).sum(-1).mean()
        torch.testing.assert_close(out.aux, 0.5 * expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(out.loss.detach(), out.mse + 0.5 * expected, rtol=1e-10, atol=0)
        # AuxK's gradient reaches the encoders of dead features only
        with_aux = grads(clt, clt.training_loss(xs, ys, dead_mask=dead, aux_k=2, aux_coefficient=0.5).loss)
        without = grads(clt, clt.training_loss(xs, ys, dead_mask=dead, aux_k=0).loss)
        diff = with_aux["W_enc"] - without["W_enc"]
        assert diff[:, :, n_dead:].abs().max() < 1e-12 and diff[:, :, :n_dead].abs().max() > 1e-6

def test_fold_scales_by_hand():
    """Inputs scaled by s_i, outputs by t_j: the folded CLT on raw inputs gives raw outputs exactly."""
    clt, xs, ys = random_clt_and_rows(seed=3)
    s, t = [2.0, 0.5, 4.0], [0.25, 3.0, 1.5]
    with torch.no_grad():
        scaled = clt([x * si for x, si in zip(xs, s)])
        folded = CrossLayerTranscoder(3, 6, 20, activation="topk", k=4).double()
        folded.load_state_dict(clt.state_dict())
        folded.fold_scales(s, t)
        raw = folded(xs)
    for j in range(3):
        torch.testing.assert_close(raw[j] * t[j], scaled[j], rtol=1e-12, atol=1e-12)
