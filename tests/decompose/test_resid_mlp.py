"""The compressed-computation residual MLP: a hand-computed forward, the factored training forward against the
plain one, the per-feature W_in mechanisms, the baselines' closed form, and a trained model beating the naive
monosemantic solution."""

from __future__ import annotations

import pytest
import torch

from interplab.decompose.components import make_components
from interplab.decompose.evaluate import score
from interplab.decompose.importance import ImportanceMLPs
from interplab.decompose.presets import Settings
from interplab.decompose.resid_mlp import (
    ResidMLP,
    ResidMLPConfig,
    ResidMLPTruth,
    baseline_losses,
    build,
    factored_forward,
    load_or_train,
    sample_features,
    train_resid_mlp,
)
from interplab.decompose.spd import Decomposition
from interplab.decompose.truth import GroundTruthModel
from interplab.errors import InterplabError

TINY = ResidMLPConfig(n_features=20, d_embed=100, d_mlp=10, feature_prob=0.05, steps=300, batch_size=512)
"""Small enough to train in ~2 s; the same shape of problem (2 features per neuron, d >> F)."""


def hand_model() -> ResidMLP:
    model = ResidMLP(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), n_layers=1, d_mlp_per_layer=1)
    with torch.no_grad():
        model.layers[0].mlp_in.weight.copy_(torch.tensor([[1.0, -1.0, 0.0]]))
        model.layers[0].mlp_out.weight.copy_(torch.tensor([[2.0], [0.0], [1.0]]))
    return model


def test_forward_by_hand():
    # x = (0.5, 0.25): r0 = (0.5, 0.25, 0); W_in r0 = 0.25 -> ReLU 0.25; r1 = r0 + 0.25·(2, 0, 1) = (1, 0.25, 0.25);
    # read off with W_Eᵀ: (1, 0.25). x = (-0.5, 0.25): W_in r0 = -0.75 -> 0, so the output is x itself.
    model = hand_model()
    x = torch.tensor([[0.5, 0.25], [-0.5, 0.25]])
    expected = torch.tensor([[1.0, 0.25], [-0.5, 0.25]])
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(factored_forward(model, x), expected)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_factored_forward_equals_the_model_with_its_gradients(n_layers):
    model = build(ResidMLPConfig(n_features=12, d_embed=40, d_mlp=6, n_layers=n_layers, seed=1))
    with torch.no_grad():                       # leave the span too, so the test covers more than build()'s state
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    x = sample_features(64, 12, 0.3, torch.Generator().manual_seed(3))
    plain = model(x).pow(2).sum()
    grads = torch.autograd.grad(plain, list(model.parameters()))
    fact = factored_forward(model, x).pow(2).sum()
    torch.testing.assert_close(fact, plain, rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(torch.autograd.grad(fact, list(model.parameters())), grads):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_true_components_are_one_rank1_mechanism_per_feature_summing_to_w_in(n_layers):
    cfg = ResidMLPConfig(n_features=12, d_embed=40, d_mlp=6, n_layers=n_layers, steps=5, batch_size=32)
    truth = ResidMLPTruth(f"resid-mlp-{n_layers}", train_resid_mlp(cfg, progress=False), cfg)
    assert isinstance(truth, GroundTruthModel)
    comps = truth.true_components()
    assert list(comps) == [f"layers.{i}.mlp_in" for i in range(n_layers)] == truth.targets
    E = truth.model.W_E
    for name, T in comps.items():
        W = truth.model.get_submodule(name).weight.detach()
        assert T.shape == (12, 6 // n_layers, 40)
        torch.testing.assert_close(T.sum(0), W, atol=1e-5, rtol=0)               # W_in stayed in span(W_E)
        assert bool((torch.linalg.matrix_rank(T) == 1).all())
        # Mechanism i reads feature i's direction and no other: T_i e_j = δ_ij W e_i.
        reads = torch.einsum("imd,jd->ijm", T, E)                                 # [i j m]
        expected = torch.einsum("ij,mi->ijm", torch.eye(12), W @ E.T)
        torch.testing.assert_close(reads, expected, atol=1e-5, rtol=0)
    assert torch.equal(truth.one_hot_inputs(), torch.eye(12))


def test_baselines_match_their_closed_form():
    # identity − monosemantic = (m / F)·p·E[ReLU(x)² | active] = (m / F)·p/6: the interference n_i of the other
    # features is independent of x_i with mean 0, so only the ReLU term differs.
    model = build(ResidMLPConfig(n_features=20, d_embed=100, d_mlp=10, feature_prob=0.05))
    x = sample_features(400_000, 20, 0.05, torch.Generator().manual_seed(4))
    losses = baseline_losses(model, x)
    assert losses.identity - losses.monosemantic == pytest.approx(10 / 20 * 0.05 / 6, rel=0.03)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_trained_model_beats_the_monosemantic_baseline(n_layers):
    cfg = ResidMLPConfig(**{**TINY.__dict__, "n_layers": n_layers})
    model = train_resid_mlp(cfg, progress=False)
    losses = baseline_losses(model, sample_features(50_000, 20, 0.05, torch.Generator().manual_seed(5)))
    assert losses.model < 0.85 * losses.monosemantic < 0.85 * losses.identity


def test_cache_returns_the_same_weights(tmp_path):
    cfg = ResidMLPConfig(n_features=12, d_embed=40, d_mlp=6, steps=20, batch_size=64)
    first = load_or_train(cfg, tmp_path, "cpu", progress=False)
    again = load_or_train(cfg, tmp_path, "cpu", progress=False)
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kw, shown", [
    ({"d_mlp": 5, "n_layers": 2}, "d_mlp=5 must split evenly over n_layers=2"),
    ({"n_features": 101}, "n_features=101 must be <= d_embed=100"),
    ({"feature_prob": 0.0}, "feature_prob must be in (0, 1], got 0.0"),
])
def test_bad_configs_raise(kw, shown):
    with pytest.raises(InterplabError) as e:
        build(ResidMLPConfig(**{**TINY.__dict__, **kw}))
    assert shown in str(e.value)


def test_a_target_without_truth_is_scored_by_its_live_count_only():
    # W_in's subcomponents set to the true mechanisms exactly (MMCS 1, ML2R 1); mlp_out has no truth, and its
    # importance functions are planted constant (γ = b2: 3 subcomponents at +5 -> g = 1, the rest at −5 -> g < 0),
    # so exactly 3 are live and its column scores are None instead of a KeyError.
    cfg = ResidMLPConfig(n_features=12, d_embed=40, d_mlp=6, steps=5, batch_size=32)
    truth = ResidMLPTruth("resid-mlp-1", train_resid_mlp(cfg, progress=False), cfg,
                          targets=["layers.0.mlp_in", "layers.0.mlp_out"])
    gen = torch.Generator().manual_seed(0)
    comps = make_components(truth.model, truth.targets, 12, gen)
    T = truth.true_components()["layers.0.mlp_in"]                              # [12, 6, 40], rank 1 each
    U, S, Vh = torch.linalg.svd(T)
    importance = torch.nn.ModuleDict({k: ImportanceMLPs(12, 4, gen) for k in comps})
    with torch.no_grad():
        comps["layers/0/mlp_in"].U.copy_(U[:, :, 0] * S[:, :1])
        comps["layers/0/mlp_in"].V.copy_(Vh[:, 0, :].T)
        out_imp = importance["layers/0/mlp_out"]
        out_imp.w2.zero_()
        out_imp.b2.copy_(torch.tensor([5.0] * 3 + [-5.0] * 9))
    settings = Settings(C=12, steps=0, lr=1e-3, batch_size=8, importance_coeff=1e-3, p=1.0, simplicity_coeff=1.0,
                        top_k=1.0)
    dec = Decomposition("spd", truth.targets, comps, importance, [], settings, 0.0, 0)
    layers = score(dec, truth, eval_batch=256)["layers"]
    assert layers["layers.0.mlp_in"]["mmcs"] == pytest.approx(1.0, abs=1e-4)
    assert layers["layers.0.mlp_in"]["ml2r"] == pytest.approx(1.0, abs=1e-4)
    assert layers["layers.0.mlp_out"]["live"] == 3
    assert layers["layers.0.mlp_out"]["live_index"] == [0, 1, 2]
    assert layers["layers.0.mlp_out"]["mmcs"] is None and layers["layers.0.mlp_out"]["n_true"] is None
