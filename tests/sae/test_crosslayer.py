"""CrossLayerTranscoder: hand-built CLTs against the model's own MLPs and hand computations; training on a toy."""

from __future__ import annotations

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models import ToyConfig, ToyTransformer
from interplab.models.tokens import ByteTokenizer
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.crosslayer_config import CLTTrainConfig
from interplab.sae.crosslayer_train import train_clt
from mlp_toys import mlp_clt


def relu_toy(n_layers: int = 2, d_model: int = 8, d_mlp: int = 12, seed: int = 0) -> ToyTransformer:
    """A random toy with ReLU MLPs and random biases (neurons on and off), in float64."""
    model = ToyTransformer(ToyConfig(n_layers=n_layers, d_model=d_model, n_heads=2, d_head=4, d_mlp=d_mlp, n_ctx=8,
                                     d_vocab=10, act_fn="relu", init_std=0.4, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.b_in.copy_(torch.randn(d_mlp, generator=g) * 0.3)
            block.mlp.b_out.copy_(torch.randn(d_model, generator=g) * 0.3)
    return model.double().eval()


def mlp_io(model: ToyTransformer, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    L = model.info.n_layers
    names = [f"blocks.{l}.mlp.hook_in" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    cache = model.run_with_cache(tokens, names).cache
    return [cache[n] for n in names[:L]], [cache[n] for n in names[L:]]


def test_clt_built_from_the_mlps_reproduces_every_mlp_output():
    model = relu_toy(n_layers=3)
    xs, ys = mlp_io(model, torch.randint(0, 10, (4, 8)))
    clt = mlp_clt(model)
    for pred, y in zip(clt(xs), ys):
        torch.testing.assert_close(pred, y, rtol=0, atol=1e-12)
    for j, y in enumerate(ys):  # decode_to from the features of every layer up to j: the same outputs
        feats = {i: clt.encode(i, xs[i]) for i in range(j + 1)}
        torch.testing.assert_close(clt.decode_to(j, feats), y, rtol=0, atol=1e-12)


def test_cross_layer_decoders_add_earlier_features_to_later_outputs():
    """Layer 0's features also write M·f_0 into layer 1's output: ŷ_1 = MLP_1(x_1) + f_0 @ M, with f_0 = ReLU(MLP_0
    pre-activations), computed from the model's own weights."""
    model = relu_toy()
    xs, ys = mlp_io(model, torch.randint(0, 10, (3, 8)))
    clt = mlp_clt(model)
    M = torch.randn(12, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        clt.W_dec[0][:, 1].copy_(M)
    f0 = torch.relu(xs[0] @ model.blocks[0].mlp.W_in + model.blocks[0].mlp.b_in)
    expected_1 = ys[1] + f0 @ M
    out = clt(xs)
    torch.testing.assert_close(out[0], ys[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], expected_1, rtol=0, atol=1e-12)
    torch.testing.assert_close(clt.decode_to(1, {0: clt.encode(0, xs[0])}) - clt.b_dec[1], f0 @ M, rtol=0, atol=1e-12)


def test_three_feature_example_by_hand():
    """L = 2, d = 2, F = 3, jumprelu θ = 0.5 everywhere. x_0 = (1, 2), x_1 = (−1, 1).
    W_enc[0] = [[1, 0, 1], [0, 1, −1]] → pre_0 = (1, 2, −1) → f_0 = (1, 2, 0).
    W_enc[1] = [[1, 1, 0], [1, 0, 0.3]] + b_enc[1] = (0, 0, 0.1) → pre_1 = (0, −1, 0.4) → f_1 = (0, 0, 0) (0.4 < θ).
    W_dec[0][:, 1] rows (1, 0), (0, 1), (5, 5); b_dec[1] = (0.5, −0.5) → ŷ_1 = 1·(1, 0) + 2·(0, 1) + (0.5, −0.5)
    = (1.5, 1.5)."""
    clt = CrossLayerTranscoder(2, 2, 3, activation="jumprelu", init_threshold=0.5)
    with torch.no_grad():
        clt.W_enc.copy_(torch.tensor([[[1.0, 0, 1], [0, 1, -1]], [[1.0, 1, 0], [1, 0, 0.3]]]))
        clt.b_enc.copy_(torch.tensor([[0.0, 0, 0], [0, 0, 0.1]]))
        clt.W_dec[0].zero_()
        clt.W_dec[0][:, 1].copy_(torch.tensor([[1.0, 0], [0, 1], [5, 5]]))
        clt.W_dec[1].fill_(7.0)
        clt.b_dec.copy_(torch.tensor([[0.0, 0], [0.5, -0.5]]))
    x0, x1 = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])
    assert clt.encode(0, x0).tolist() == [1.0, 2.0, 0.0]
    assert clt.encode(1, x1).tolist() == [0.0, 0.0, 0.0]
    assert clt([x0, x1])[1].tolist() == [1.5, 1.5]


def test_topk_keeps_the_k_largest_positive_pre_activations():
    clt = CrossLayerTranscoder(1, 2, 4, activation="topk", k=2)
    with torch.no_grad():
        clt.W_enc[0].copy_(torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    # pre = (3, −3, 1.5, 0): top 2 are 3 and 1.5
    assert clt.encode(0, torch.tensor([3.0, 0.0])).tolist() == [3.0, 0.0, 1.5, 0.0]
    # pre = (−1, 1, −0.5, 0): top 2 are 1 and 0 → ReLU keeps (0, 1, 0, 0)
    assert clt.encode(0, torch.tensor([-1.0, 0.0])).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_bad_input_is_refused():
    clt = CrossLayerTranscoder(2, 4, 6)
    with pytest.raises(InterplabError, match="cannot write to the earlier layer 0"):
        clt.decode_to(0, {1: torch.zeros(6)})
    with pytest.raises(InterplabError, match="one input per layer"):
        clt([torch.zeros(4)])
    with pytest.raises(InterplabError, match="not a layer of this CLT"):
        clt.encode(2, torch.zeros(4))
    with pytest.raises(InterplabError, match="unknown CLT activation 'gelu'"):
        CrossLayerTranscoder(2, 4, 6, activation="gelu")
    with pytest.raises(InterplabError, match="k < d_sae"):
        CrossLayerTranscoder(2, 4, 6, activation="topk", k=6)
    with pytest.raises(InterplabError, match="unknown --activation 'tanh'"):
        train_clt(CLTTrainConfig(activation="tanh"), model=relu_toy(), token_batches=[], progress=False)


def fvu(clt: CrossLayerTranscoder, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """Σ_j ‖y_j − ŷ_j‖² / Σ_j ‖y_j − mean y_j‖² over held-out tokens."""
    with torch.no_grad():
        preds = clt(xs)
    err = sum(((p - y) ** 2).sum() for p, y in zip(preds, ys))
    var = sum(((y - y.mean(0)) ** 2).sum() for y in ys)
    return float(err / var)


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_training_on_a_toy_explains_most_of_the_mlp_outputs(activation, tmp_path):
    """Trained on random token batches of a 2-layer toy, the CLT predicts held-out MLP outputs far better than the
    best constant (FVU 1), which is where its b_dec starts."""
    torch.manual_seed(0)
    model = relu_toy(d_model=8, d_mlp=16).float()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 10, (16, 8), generator=g) for _ in range(150)]
    cfg = CLTTrainConfig(model="toy", d_sae=[32], activation=activation, k=[6], lr=1e-2, tokens=150 * 16 * 7,
                         l1_coefficient=[1e-4], l0_coefficient=[1e-4], batch_size=16, ctx_len=8, out=str(tmp_path))
    result = train_clt(cfg, model=model, token_batches=batches, progress=False)
    clt = result.clts[result.names[0]]  # as trained: it reads inputs x in_scales and predicts outputs x out_scales
    held = torch.randint(0, 10, (32, 8), generator=g)
    xs, ys = mlp_io(model, held)
    xs = [x[:, 1:].flatten(0, 1) * s for x, s in zip(xs, result.in_scales)]
    ys = [y[:, 1:].flatten(0, 1) * t for y, t in zip(ys, result.out_scales)]
    assert fvu(clt, xs, ys) < 0.2
    if activation == "topk":  # decoders kept at unit norm over all output layers
        torch.testing.assert_close(clt.decoder_norms(), torch.ones(2, 32), rtol=0, atol=1e-5)


def test_training_reads_the_configured_corpus(tmp_path):
    """Without token batches, contexts come from cfg.corpus through the model's tokenizer."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the cat {i} sat on the mat {i % 7} and the dog ran" for i in range(400)))
    model = ToyTransformer(ToyConfig(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16, n_ctx=16, d_vocab=257,
                                     act_fn="relu", init_std=0.4)).eval()
    with pytest.raises(InterplabError, match="has no tokenizer"):
        train_clt(CLTTrainConfig(corpus=str(corpus), ctx_len=16, tokens=1000, out=str(tmp_path / "a")), model=model,
                  progress=False)
    assert not (tmp_path / "a").exists()
    model.tokenizer = ByteTokenizer()
    cfg = CLTTrainConfig(corpus=str(corpus), split="all", ctx_len=16, batch_size=8, d_sae=[32], k=[4], lr=1e-2,
                         tokens=100 * 8 * 15, out=str(tmp_path / "b"))
    result = train_clt(cfg, model=model, progress=False)
    clt = result.clts[result.names[0]]
    xs, ys = mlp_io(model, torch.tensor([ByteTokenizer()(["the cat 3 sat on"])["input_ids"][0]]))
    xs = [x[0, 1:] * s for x, s in zip(xs, result.in_scales)]
    ys = [y[0, 1:] * t for y, t in zip(ys, result.out_scales)]
    assert fvu(clt, xs, ys) < 0.5
