"""Circuits of a toy head whose OV and QK matrices are planted, read back through extract + circuits."""

from __future__ import annotations

import torch

from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.weights.circuits import (
    composition_score,
    composition_scores,
    copying_score,
    full_ov_circuit,
    full_qk_circuit,
    ov_circuit,
    qk_circuit,
)
from interplab.weights.extract import attention_weights, embedding, unembedding
from interplab.weights.factored import FactoredMatrix

D_VOCAB, D_MODEL = 8, 16
STRENGTHS = torch.arange(D_VOCAB, 0, -1).float()  # 8, 7, ..., 1: distinct, so the SVD directions are unique


def copying_model(sign: float = 1.0) -> ToyTransformer:
    """One attention-only layer, no LayerNorm. Tokens embed as orthonormal vectors e_t (W_U = W_Eᵀ); head 0 has
    W_OV = Σ_t sign·s_t e_tᵀ e_t, so token t attended to adds sign·s_t to its own logit: an exact copying head."""
    model = ToyTransformer(ToyConfig(n_layers=1, d_model=D_MODEL, n_heads=2, d_head=D_VOCAB, d_mlp=None,
                                     d_vocab=D_VOCAB, n_ctx=8, layer_norm=False))
    basis = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=torch.Generator().manual_seed(0)))[0]
    E = basis[:D_VOCAB]  # [vocab, d_model], orthonormal rows
    with torch.no_grad():
        model.W_E.copy_(E)
        model.W_U.copy_(E.T)
        attn = model.blocks[0].attn
        attn.W_V[0].copy_(E.T)  # reads the token's coordinates
        attn.W_O[0].copy_(sign * STRENGTHS[:, None] * E)  # writes them back, scaled
        attn.W_Q[0].copy_(E.T)
        attn.W_K[0].copy_(E.T @ torch.diag(STRENGTHS))  # query t attends to key t with score s_t
    return model.eval()


def test_full_ov_circuit_of_a_copying_head_is_diagonal_and_copying_score_is_one():
    model = copying_model()
    attn = attention_weights(model, 0)
    full = full_ov_circuit(attn, embedding(model), unembedding(model)[0])
    torch.testing.assert_close(full[0].AB, torch.diag(STRENGTHS), atol=1e-5, rtol=1e-5)
    assert abs(float(copying_score(full[0])) - 1.0) < 1e-5
    anti = full_ov_circuit(attention_weights(copying_model(-1.0), 0), embedding(model), unembedding(model)[0])
    assert abs(float(copying_score(anti[0])) + 1.0) < 1e-5
    # The untouched head 1 has N(0, 0.02²) weights: no strong sign either way.
    assert abs(float(copying_score(full[1]))) < 0.6


def test_ov_svd_directions_are_the_planted_token_directions():
    model = copying_model()
    U, S, V = ov_circuit(attention_weights(model, 0))[0].svd()
    torch.testing.assert_close(S[:D_VOCAB], STRENGTHS, atol=1e-5, rtol=1e-5)
    # The i-th write direction is ± the embedding of token i (the one with the i-th largest strength).
    logits = V[:, :D_VOCAB].T @ model.W_U.detach()
    assert logits.abs().argmax(dim=-1).tolist() == list(range(D_VOCAB))


def test_qk_circuit_matches_dense_and_full_qk_matches_planted_scores():
    model = copying_model()
    attn = attention_weights(model, 0)
    torch.testing.assert_close(qk_circuit(attn).AB, attn.W_Q @ attn.W_K.transpose(-1, -2))
    full = full_qk_circuit(attn, embedding(model))
    torch.testing.assert_close(full[0].AB, torch.diag(STRENGTHS), atol=1e-5, rtol=1e-5)


def test_composition_score_by_hand():
    # Orthogonal ranges: 0. Identical projections: ‖P P‖ / ‖P‖² = ‖P‖ / ‖P‖² = 1/sqrt(rank).
    e = torch.eye(4)
    first = FactoredMatrix(e[:, :2], e[:2])  # projects onto coordinates 0, 1
    other = FactoredMatrix(e[:, 2:], e[2:])  # onto 2, 3
    assert float(composition_score(first, other)) == 0.0
    assert abs(float(composition_score(first, first)) - 2 ** -0.5) < 1e-6
    model = ToyTransformer(ToyConfig(n_layers=2, d_model=16, n_heads=3, d_head=4, d_mlp=None, d_vocab=8))
    scores = composition_scores(attention_weights(model, 0), attention_weights(model, 1))
    ov0, qk1 = ov_circuit(attention_weights(model, 0)), qk_circuit(attention_weights(model, 1))
    dense_q = torch.linalg.matrix_norm(ov0.AB[2] @ qk1.AB[1]) / (
        torch.linalg.matrix_norm(ov0.AB[2]) * torch.linalg.matrix_norm(qk1.AB[1]))
    assert scores["q"].shape == (3, 3)
    torch.testing.assert_close(scores["q"][2, 1], dense_q)
    dense_k = torch.linalg.matrix_norm(ov0.AB[2] @ qk1.AB[1].T) / (
        torch.linalg.matrix_norm(ov0.AB[2]) * torch.linalg.matrix_norm(qk1.AB[1]))
    torch.testing.assert_close(scores["k"][2, 1], dense_k)
