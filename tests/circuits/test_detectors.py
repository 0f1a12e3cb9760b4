"""Head detectors against planted answers: hand-made attention patterns, a toy transformer whose heads attend to the
previous token / the earlier copy of the token by construction, OV circuits that copy or suppress by construction,
and the eigenvalue shortcut against the dense full OV circuit."""

from __future__ import annotations

import pytest
import torch

from interplab.circuits.detectors import (
    copying_scores,
    detect_heads,
    detector_keys,
    pattern_statistics,
    random_keys,
    random_weights_model,
    repeated_tokens,
    token_pool,
)
from interplab.errors import InterplabError
from interplab.models.load import load_model
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.weights.extract import attention_weights, embedding, normalize, unembedding

L = 6  # |R| of the planted tests
V = 64
N_CTX = 1 + 2 * L
C = 300.0  # attention logit scale of the planted heads (before 1/sqrt(d_head)): patterns are near one-hot


def test_pattern_statistics_read_the_planted_key():
    """A pattern that puts all attention at query − 1 scores 1 as previous-token and 0 elsewhere; one that attends
    to the token after the earlier copy scores 1 as induction."""
    keys = detector_keys(L, offset=1)
    queries = torch.arange(L) + 1 + L
    for planted in ("previous_token", "induction", "duplicate_token"):
        pattern = torch.zeros(2, 3, N_CTX, N_CTX)
        pattern[:, :, queries, keys[planted]] = 1.0
        for name, k in keys.items():
            got = pattern_statistics(pattern, k, L, offset=1)
            assert torch.allclose(got, torch.full((2, 3), float(name == planted))), (planted, name)


def test_random_keys_avoid_the_target_and_stay_causal():
    gen = torch.Generator().manual_seed(0)
    for name, target in detector_keys(L, offset=1).items():
        keys = random_keys(target, 1, 2000, gen)
        queries = torch.arange(L) + 1 + L
        assert bool((keys != target).all()) and bool((keys >= 1).all()) and bool((keys <= queries).all()), name
        # Uniform over the q − 1 allowed keys: every allowed key of the last query is drawn.
        assert set(keys[:, -1].tolist()) == set(range(1, int(queries[-1]) + 1)) - {int(target[-1])}


def planted_model(copy_sign: tuple[float, float] = (1.0, -1.0)) -> ToyTransformer:
    """One layer, no LayerNorm, one-hot positions (dims 0 … n_ctx−1) and tokens (dims n_ctx …). Head 0 attends to
    the previous position; head 1 to earlier positions holding the same token (self excluded). OV of head h is
    copy_sign[h] × the projection onto the token dims, and W_U reads the token dims: full OV = ±I."""
    d = N_CTX + V
    model = ToyTransformer(ToyConfig(n_layers=1, d_model=d, n_heads=2, d_head=d, d_mlp=None, n_ctx=N_CTX,
                                     d_vocab=V, layer_norm=False))
    eye, tok = torch.eye(d), torch.arange(N_CTX, d)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_pos[:, :N_CTX] = torch.eye(N_CTX)
        model.W_E[:, N_CTX:] = torch.eye(V)
        model.W_U[N_CTX:, :] = torch.eye(V)
        attn = model.blocks[0].attn
        attn.W_Q[0, :N_CTX, :N_CTX] = C * torch.eye(N_CTX)  # query at q: C e_q
        attn.W_K[0, :N_CTX - 1, 1:N_CTX] = torch.eye(N_CTX - 1)  # key at p: e_{p+1}  → score C when p = q − 1
        attn.W_Q[1] = C * eye  # same token +C, same position −C (the key's position dims are negated)
        attn.W_K[1, N_CTX:, N_CTX:] = torch.eye(V)
        attn.W_K[1, :N_CTX, :N_CTX] = -torch.eye(N_CTX)
        for h, sign in enumerate(copy_sign):
            attn.W_V[h, tok, tok] = 1.0
            attn.W_O[h, tok, tok] = sign
    return model.eval()


def test_planted_heads_are_found_above_both_controls():
    found = detect_heads(planted_model(), n_seqs=16, seq_len=L, batch_size=8, seed=0)
    prev, dup, ind = found.previous_token, found.duplicate_token, found.induction
    assert prev.score[0, 0] > 0.99 and prev.score[0, 1] < 0.05
    assert dup.score[0, 1] > 0.8 and dup.score[0, 0] < 0.05
    assert float(ind.score.max()) < 0.1  # nothing here attends to the token after the earlier copy
    for scores, head in ((prev, 0), (dup, 1)):
        # shuffled: nothing on a random other key; random weights: near-uniform, ≈ 1/(q+1)
        assert scores.shuffled[0, head] < 0.05
        assert 0.03 < scores.random_weights[0, head] < 0.15
        assert scores.sem[0, head] < 0.05 and scores.random_weights_sem is not None
    assert torch.allclose(found.copying.score, torch.tensor([[1.0, -1.0]]), atol=1e-5)
    assert torch.allclose(found.copy_suppression.score, torch.tensor([[-1.0, 1.0]]), atol=1e-5)
    # A permutation's eigenvalues are roots of unity: Σ Re λ / Σ|λ| = fixed points / V, small for a random one.
    assert float(found.copying.shuffled.abs().max()) < 0.2
    assert float(found.copying.random_weights.abs().max()) < 0.5


def test_copying_score_equals_the_dense_full_ov_circuit():
    """Σ Re λ / Σ |λ| of the dense x̂_E W_V W_O W_U (LayerNorm folded, W_U centred over the vocabulary) equals the
    d_head × d_head shortcut."""
    model = ToyTransformer(ToyConfig(n_layers=2, d_model=24, n_heads=3, d_head=4, d_mlp=None, n_ctx=8, d_vocab=20,
                                     init_std=0.3, seed=3))
    with torch.no_grad():
        for block in model.blocks:
            block.ln1.weight.uniform_(0.5, 1.5)
            block.ln1.bias.normal_()
    got, _ = copying_scores(model, seed=0)
    E, (U, _) = normalize(model, embedding(model)), unembedding(model)
    U = U - U.mean(1, keepdim=True)  # centred by hand: each column minus the mean column
    for layer in range(2):
        attn = attention_weights(model, layer)
        for head in range(3):
            eig = torch.linalg.eigvals((E @ attn.W_V[head] @ attn.W_O[head] @ U).double())
            assert float(got[layer, head]) == pytest.approx(float(eig.real.sum() / eig.abs().sum()), abs=1e-4)


def test_repeated_tokens_and_controls_on_a_tiny_hf_model(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir), device="cpu")
    bos, pool = token_pool(model)
    assert bos == model.tokenizer.bos_token_id and bos not in set(pool.tolist())
    tokens = repeated_tokens(model, 4, 10, seed=1)
    assert tokens.shape == (4, 21) and bool((tokens[:, 0] == bos).all())
    assert torch.equal(tokens[:, 1:11], tokens[:, 11:])
    control = random_weights_model(model, seed=0)
    theirs, ours = control.model.state_dict(), model.model.state_dict()
    assert theirs.keys() == ours.keys() and all(theirs[k].shape == ours[k].shape for k in ours)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(theirs[q_proj], ours[q_proj])
    found = detect_heads(model, n_seqs=4, seq_len=10, batch_size=2, control=control)
    assert found.induction.score.shape == (3, 4) and found.copying.score.shape == (3, 4)
    # scores are attention masses (in [0, 1]); copying scores lie in [−1, 1]
    assert 0 <= float(found.previous_token.score.min()) and float(found.previous_token.score.max()) <= 1
    assert float(found.copying.score.abs().max()) <= 1 + 1e-5


def test_bad_input_is_refused_before_any_work():
    model = planted_model()
    with pytest.raises(InterplabError, match="seq-len"):
        detect_heads(model, seq_len=L + 1)
    with pytest.raises(InterplabError, match="n_seqs"):
        detect_heads(model, n_seqs=1, seq_len=L)
