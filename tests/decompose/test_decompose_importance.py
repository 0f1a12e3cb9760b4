"""Leaky hard sigmoids, the causal-importance MLP and the importance-minimality term against hand computation."""

from __future__ import annotations

import torch

from interplab.decompose.importance import (
    ImportanceMLPs,
    importance_minimality,
    lower_leaky_hard_sigmoid,
    upper_leaky_hard_sigmoid,
)
from interplab.decompose.spd import stochastic_mask


def test_leaky_hard_sigmoids_by_hand():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0, 3.0])
    assert torch.allclose(lower_leaky_hard_sigmoid(x), torch.tensor([-0.01, -0.005, 0.0, 0.25, 1.0, 1.0]))
    assert torch.allclose(upper_leaky_hard_sigmoid(x), torch.tensor([0.0, 0.0, 0.0, 0.25, 1.0, 1.02]))
    # The leaky side keeps a gradient of 0.01; the flat side has none.
    x = torch.tensor([-2.0, 2.0], requires_grad=True)
    lower_leaky_hard_sigmoid(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.01, 0.0]))


def test_importance_mlp_matches_its_formula():
    mlp = ImportanceMLPs(C=2, hidden=3, gen=torch.Generator().manual_seed(0))
    h = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    with torch.no_grad():
        out = mlp(h)
        for b in range(2):
            for c in range(2):
                hidden = torch.nn.functional.gelu(mlp.w1[c] * h[b, c] + mlp.b1[c])
                assert torch.isclose(out[b, c], (hidden * mlp.w2[c]).sum() + mlp.b2[c], atol=1e-6)


def test_importance_minimality_by_hand():
    g = {"a": torch.tensor([[0.5, 0.0], [1.0, 0.2]]), "b": torch.tensor([[0.1], [0.3]])}
    # p = 1: per input Σ_c g: (0.5 + 0.1, 1.2 + 0.3) -> mean 1.05; p = 2: (0.25 + 0.01, 1.04 + 0.09) -> mean 0.695.
    assert torch.isclose(importance_minimality(g, 1.0), torch.tensor(1.05))
    assert torch.isclose(importance_minimality(g, 2.0), torch.tensor(0.695))


def test_stochastic_masks_lie_between_g_and_one():
    g = torch.tensor([0.0, 0.3, 1.0]).expand(1000, 3)
    m = stochastic_mask(g, torch.Generator().manual_seed(0))
    assert bool((m >= g).all()) and bool((m <= 1).all())
    assert torch.equal(m[:, 2], torch.ones(1000))          # important: never ablated
    assert abs(float(m[:, 0].mean()) - 0.5) < 0.05          # unimportant: uniform on [0, 1]


def test_importance_mlp_gradients_match_autograd_of_the_formula():
    """The hand-written backward (ScalarMLPs) against autograd through the plain broadcast formula."""
    gen = torch.Generator().manual_seed(1)
    mlp = ImportanceMLPs(C=4, hidden=5, gen=gen)
    with torch.no_grad():
        mlp.b1.normal_(generator=gen)
        mlp.b2.normal_(generator=gen)
    h = torch.randn(3, 7, 4, generator=gen, requires_grad=True)  # extra leading axis: reshaped inside
    weights = torch.randn(3, 7, 4, generator=gen)
    params = [h, *mlp.parameters()]
    fused = torch.autograd.grad((mlp(h) * weights).sum(), params)
    plain = (torch.nn.functional.gelu(h[..., None] * mlp.w1 + mlp.b1) * mlp.w2).sum(-1) + mlp.b2
    expected = torch.autograd.grad((plain * weights).sum(), params)
    assert torch.allclose(mlp(h), plain, atol=1e-6)
    for got, want in zip(fused, expected):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
