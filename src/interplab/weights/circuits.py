"""A head's circuits as factored matrices (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits").

With weights stored for `x @ W` (rows are residual vectors):

    attention score  s(x_q, x_k) = x_q W_Q W_Kᵀ x_kᵀ      W_QK = W_Q W_Kᵀ   [d_model, d_model]
    what is moved    x_k ↦ x_k W_V W_O                    W_OV = W_V W_O    [d_model, d_model]
    full circuits    E W_QK Eᵀ  [d_vocab, d_vocab]          E W_OV U         [d_vocab, d_vocab]

The weights come from `interplab.weights.extract`, with the norm scale folded in, so each circuit acts on the
normalised residual stream; for rotary models W_QK is the circuit at zero relative offset (positions rotate it).
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from interplab.weights.extract import AttentionWeights
from interplab.weights.factored import FactoredMatrix

Tensor = torch.Tensor


def qk_circuit(attn: AttentionWeights) -> FactoredMatrix:
    """W_QK = W_Q W_Kᵀ, one per head: [head, d_model (query side), d_model (key side)]."""
    return FactoredMatrix(attn.W_Q, attn.W_K.transpose(-1, -2))


def ov_circuit(attn: AttentionWeights) -> FactoredMatrix:
    """W_OV = W_V W_O, one per head: [head, d_model (read), d_model (written)]."""
    return FactoredMatrix(attn.W_V, attn.W_O)


def full_qk_circuit(attn: AttentionWeights, W_E: Float[Tensor, "d_vocab d_model"]) -> FactoredMatrix:
    """E W_QK Eᵀ: the attention score of every (query token, key token) pair through this head alone,
    [head, d_vocab, d_vocab], kept factored through d_head."""
    return FactoredMatrix(W_E @ attn.W_Q, attn.W_K.transpose(-1, -2) @ W_E.T)


def full_ov_circuit(
    attn: AttentionWeights, W_E: Float[Tensor, "d_vocab d_model"], W_U: Float[Tensor, "d_model d_vocab"]
) -> FactoredMatrix:
    """E W_OV U: the logits each attended token adds to each output token through this head,
    [head, d_vocab, d_vocab], kept factored through d_head."""
    return FactoredMatrix(W_E @ attn.W_V, attn.W_O @ W_U)


def copying_score(circuit: FactoredMatrix) -> Float[Tensor, "..."]:
    """Σ Re λ / Σ |λ| over the eigenvalues of a square circuit (Elhage et al. 2021): +1 for a matrix whose eigenvalues
    are all positive (it maps tokens to themselves: copying), −1 for all negative (suppression), near 0 for random."""
    eig = circuit.eigenvalues()
    return eig.real.sum(-1) / eig.abs().sum(-1).clamp_min(torch.finfo(eig.real.dtype).tiny)


def composition_score(first: FactoredMatrix, second: FactoredMatrix) -> Float[Tensor, "..."]:
    """‖M₁ M₂‖_F / (‖M₁‖_F ‖M₂‖_F): how much of what M₁ writes M₂ reads (Elhage et al. 2021).

    For an earlier head's W_OV and a later head's circuits: Q-composition is (W_OV¹, W_QK²), K-composition is
    (W_OV¹, W_QK²ᵀ), V-composition is (W_OV¹, W_OV²). Leading dimensions broadcast, so stacks of heads
    [h1, 1, d, d] and [1, h2, d, d] give the [h1, h2] table."""
    return (first @ second).norm() / (first.norm() * second.norm())


def composition_scores(earlier: AttentionWeights, later: AttentionWeights) -> dict[str, Float[Tensor, "h1 h2"]]:
    """Q-, K- and V-composition of every (earlier head, later head) pair."""
    ov1 = ov_circuit(earlier)
    ov1 = FactoredMatrix(ov1.A[:, None], ov1.B[:, None])  # [h1, 1, d, d]
    qk2, ov2 = qk_circuit(later), ov_circuit(later)
    qk2, ov2 = (FactoredMatrix(m.A[None], m.B[None]) for m in (qk2, ov2))  # [1, h2, d, d]
    return {"q": composition_score(ov1, qk2), "k": composition_score(ov1, qk2.T), "v": composition_score(ov1, ov2)}
