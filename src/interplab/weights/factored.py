"""`FactoredMatrix`: a product M = A @ B kept as its two factors.

A head's circuits are low rank: W_OV = W_V W_O maps d_model → d_model through d_head, and the full circuit
W_E W_V W_O W_U is d_vocab × d_vocab of rank d_head. Forming them densely costs d_model² (or d_vocab²) memory and an
O(d³) SVD; kept factored, every question below is answered through a k × k middle matrix (k = the inner width):

    ‖AB‖_F²      = tr(AᵀA · BBᵀ)                                     (two k × k Gram matrices)
    SVD(AB)      : A = Q_A R_A, Bᵀ = Q_B R_B, R_A R_Bᵀ = U_m S V_mᵀ  ⇒  AB = (Q_A U_m) S (Q_B V_m)ᵀ
    eig(AB)      = eig(BA) ∪ {0, ...}                                 (BA is k × k)

Leading dimensions broadcast like torch's batched matmul, so a stack of heads is one FactoredMatrix
[head, d_model, d_model] and `fm[h]` is head h.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
from jaxtyping import Complex, Float

from interplab.errors import InterplabError

Tensor = torch.Tensor


class SVD(NamedTuple):
    """M = U diag(S) Vᵀ, singular values descending; columns of U and V are orthonormal."""

    U: Float[Tensor, "... m r"]
    S: Float[Tensor, "... r"]
    V: Float[Tensor, "... n r"]


class FactoredMatrix:
    """M = A @ B with A [..., m, k] and B [..., k, n], never multiplied out unless asked (`.AB`)."""

    def __init__(self, A: Float[Tensor, "... m k"], B: Float[Tensor, "... k n"]):
        if not (isinstance(A, Tensor) and isinstance(B, Tensor)) or A.ndim < 2 or B.ndim < 2:
            raise InterplabError(f"FactoredMatrix needs two tensors of at least 2 dimensions, got {_describe(A)} "
                                 f"and {_describe(B)}")
        if A.shape[-1] != B.shape[-2]:
            raise InterplabError(f"FactoredMatrix factors do not chain: A is {tuple(A.shape)}, B is {tuple(B.shape)} "
                                 f"(A's last dimension must equal B's second-to-last)")
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise InterplabError(f"FactoredMatrix leading dimensions do not broadcast: {tuple(A.shape[:-2])} vs "
                                 f"{tuple(B.shape[:-2])}") from None
        self.A = A.expand(*lead, *A.shape[-2:])
        self.B = B.expand(*lead, *B.shape[-2:])

    # ---- shape -------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """Shape of the product [..., m, n]."""
        return torch.Size((*self.A.shape[:-1], self.B.shape[-1]))

    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def mdim(self) -> int:
        """The inner width k: an upper bound on the rank."""
        return self.A.shape[-1]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, inner={self.mdim})"

    # ---- algebra -----------------------------------------------------------------------------------------------
    @property
    def AB(self) -> Float[Tensor, "... m n"]:
        """The dense product."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... k k"]:
        """The k × k product B A (square M only): it shares M's nonzero eigenvalues."""
        if self.ldim != self.rdim:
            raise InterplabError(f"BA needs a square matrix; this one is {self.ldim} × {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """Mᵀ = Bᵀ Aᵀ."""
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __matmul__(self, other: Union[Tensor, FactoredMatrix]) -> FactoredMatrix:
        """M @ other, still factored. With another FactoredMatrix C D the inner width stays min(k, k')."""
        if isinstance(other, FactoredMatrix):
            self._check_chain(other.ldim)
            if self.mdim <= other.mdim:
                return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
            return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
        if isinstance(other, Tensor):
            if other.ndim == 1:
                raise InterplabError("multiply a FactoredMatrix by a matrix [..., n, p], not a vector")
            self._check_chain(other.shape[-2])
            return FactoredMatrix(self.A, self.B @ other)
        return NotImplemented

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix:
        """other @ M, still factored."""
        if not isinstance(other, Tensor) or other.ndim < 2:
            return NotImplemented
        if other.shape[-1] != self.ldim:
            raise InterplabError(f"cannot multiply {tuple(other.shape)} by a FactoredMatrix of shape "
                                 f"{tuple(self.shape)}")
        return FactoredMatrix(other @ self.A, self.B)

    def __getitem__(self, index: int | slice | tuple) -> FactoredMatrix:
        """Index the leading dimensions (e.g. a head): `fm[h]`, `fm[2:4]`. The matrix dimensions are kept whole."""
        n_lead = self.A.ndim - 2
        items = index if isinstance(index, tuple) else (index,)
        if n_lead == 0 or len(items) > n_lead or any(item is Ellipsis for item in items):
            raise InterplabError(f"a FactoredMatrix of shape {tuple(self.shape)} has {n_lead} leading dimension(s) "
                                 f"to index; got index {index!r}")
        for dim, item in enumerate(items):
            if isinstance(item, int) and not -self.A.shape[dim] <= item < self.A.shape[dim]:
                raise InterplabError(f"index {item} is out of range for leading dimension {dim} of size "
                                     f"{self.A.shape[dim]}")
        return FactoredMatrix(self.A[items], self.B[items])

    def _check_chain(self, n: int) -> None:
        if n != self.rdim:
            raise InterplabError(f"cannot multiply a FactoredMatrix of shape {tuple(self.shape)} by a matrix with "
                                 f"{n} rows")

    # ---- what a researcher asks of it ---------------------------------------------------------------------------
    def norm(self) -> Float[Tensor, "..."]:
        """Frobenius norm: ‖AB‖_F = sqrt(Σ_ij (AᵀA)_ij (BBᵀ)_ij), through k × k Gram matrices."""
        gram_A = self.A.transpose(-1, -2) @ self.A  # [..., k, k]
        gram_B = self.B @ self.B.transpose(-1, -2)  # [..., k, k]
        return (gram_A * gram_B).sum(dim=(-1, -2)).clamp_min(0).sqrt()

    def svd(self) -> SVD:
        """Thin SVD of AB through QR of both factors and the SVD of their small middle matrix.

        Rank r = min(m, n, k) singular triplets. Singular vectors of repeated or zero singular values are, as for any
        SVD, determined only up to rotation within their subspace; each vector's sign is arbitrary."""
        Q_A, R_A = torch.linalg.qr(self.A)  # [..., m, a], [..., a, k]  with a = min(m, k)
        Q_B, R_B = torch.linalg.qr(self.B.transpose(-1, -2))  # [..., n, b], [..., b, k]
        U_mid, S, Vh_mid = torch.linalg.svd(R_A @ R_B.transpose(-1, -2), full_matrices=False)
        return SVD(Q_A @ U_mid, S, Q_B @ Vh_mid.transpose(-1, -2))

    def eigenvalues(self) -> Complex[Tensor, "... k"]:
        """The k eigenvalues of BA: M's nonzero eigenvalues, padded with zeros when M is larger than k × k."""
        return torch.linalg.eigvals(self.BA)

    def to(self, *args, **kwargs) -> FactoredMatrix:
        return FactoredMatrix(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs))


def _describe(x: object) -> str:
    return f"tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
