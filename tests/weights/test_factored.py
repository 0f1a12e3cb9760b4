"""FactoredMatrix against the dense product on random matrices."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.weights.factored import FactoredMatrix


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def heads() -> FactoredMatrix:
    """Three 'heads' W_V W_O: [3, 12, 12] through an inner width of 4."""
    return FactoredMatrix(_random(3, 12, 4, seed=1), _random(3, 4, 12, seed=2))


def test_product_transpose_and_shape(heads):
    dense = heads.A @ heads.B
    assert heads.shape == (3, 12, 12) and heads.mdim == 4
    torch.testing.assert_close(heads.AB, dense)
    torch.testing.assert_close(heads.T.AB, dense.transpose(-1, -2))


def test_matmul_with_tensors_and_factored_matrices(heads):
    dense = heads.AB
    other = _random(12, 5, seed=3)
    torch.testing.assert_close((heads @ other).AB, dense @ other)
    torch.testing.assert_close((other.T @ heads).AB, other.T @ dense)
    wide = FactoredMatrix(_random(12, 7, seed=4), _random(7, 6, seed=5))
    product = heads @ wide
    torch.testing.assert_close(product.AB, dense @ wide.AB)
    assert product.mdim == 4  # the narrower inner width is kept
    narrow = FactoredMatrix(_random(12, 2, seed=6), _random(2, 6, seed=7))
    assert (heads @ narrow).mdim == 2
    torch.testing.assert_close((heads @ narrow).AB, dense @ narrow.AB)


def test_indexing_selects_heads_and_broadcasts():
    shared_B = _random(4, 9, seed=8)
    fm = FactoredMatrix(_random(3, 9, 4, seed=9), shared_B)  # B broadcast over heads
    torch.testing.assert_close(fm[1].AB, fm.A[1] @ shared_B)
    assert fm[0:2].shape == (2, 9, 9)
    with pytest.raises(InterplabError, match="out of range"):
        fm[3]
    with pytest.raises(InterplabError, match="leading dimension"):
        fm[0][0]


def test_norm_equals_dense_frobenius(heads):
    torch.testing.assert_close(heads.norm(), torch.linalg.matrix_norm(heads.AB))


@pytest.mark.parametrize("m,k,n", [(12, 4, 12), (5, 8, 9), (20, 3, 6)])
def test_svd_equals_dense_svd(m, k, n):
    fm = FactoredMatrix(_random(2, m, k, seed=10), _random(2, k, n, seed=11))
    U, S, V = fm.svd()
    dense_S = torch.linalg.svdvals(fm.AB)
    r = min(m, n, k)
    torch.testing.assert_close(S, dense_S[..., :r])
    # The triplets rebuild the matrix, and the singular vectors are orthonormal.
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.transpose(-1, -2), fm.AB)
    eye = torch.eye(r, dtype=S.dtype).expand(2, r, r)
    torch.testing.assert_close(U.transpose(-1, -2) @ U, eye)
    torch.testing.assert_close(V.transpose(-1, -2) @ V, eye)
    # Each singular vector matches the dense one up to sign (the spectrum is generic, so no rotations).
    dense_U = torch.linalg.svd(fm.AB).U[..., :r]
    torch.testing.assert_close((U * dense_U).sum(-2).abs(), torch.ones(2, r, dtype=S.dtype))


def test_eigenvalues_are_the_nonzero_eigenvalues_of_the_product(heads):
    eig = heads.eigenvalues()  # [3, 4]
    dense = torch.linalg.eigvals(heads.AB)  # [3, 12]: four nonzero, eight ~0
    for h in range(3):
        big = dense[h][dense[h].abs() > 1e-8]
        assert len(big) == 4
        for value in eig[h]:
            assert (big - value).abs().min() < 1e-8


def test_errors_name_the_shapes():
    with pytest.raises(InterplabError, match=r"do not chain.*\(5, 3\).*\(4, 2\)"):
        FactoredMatrix(torch.zeros(5, 3), torch.zeros(4, 2))
    with pytest.raises(InterplabError, match="do not broadcast"):
        FactoredMatrix(torch.zeros(2, 5, 3), torch.zeros(3, 3, 2))
    with pytest.raises(InterplabError, match="at least 2 dimensions"):
        FactoredMatrix(torch.zeros(5), torch.zeros(5, 2))
    with pytest.raises(InterplabError, match="square"):
        FactoredMatrix(torch.zeros(5, 3), torch.zeros(3, 2)).BA
    with pytest.raises(InterplabError, match="with 4 rows"):
        FactoredMatrix(torch.zeros(5, 3), torch.zeros(3, 2)) @ torch.zeros(4, 2)
