"""The masked forward by hand: all masks 1 is the model when the subcomponents sum to W, a 0 removes exactly one
rank-1 term, embeddings read rows, and bad targets are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interplab.decompose.components import (
    check_masks_apply,
    make_components,
    masked_forward,
    module_key,
)
from interplab.errors import InterplabError


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _exact(model: TwoLayer) -> nn.ModuleDict:
    """Components of `a` with C = 3 that sum to its weight exactly: V = I, U[c] = column c of W."""
    comps = make_components(model, ["a"], 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        comps[module_key("a")].V.copy_(torch.eye(3))
        comps[module_key("a")].U.copy_(model.a.weight.T)
    return comps


def test_all_masks_one_is_the_original_model_and_a_zero_removes_one_rank_one_term():
    torch.manual_seed(0)
    model, x = TwoLayer(), torch.randn(5, 3)
    comps = _exact(model)
    with torch.no_grad():
        expected = model(x)
        with masked_forward(model, comps, {"a": torch.ones(3)}) as fired:
            assert torch.allclose(model(x), expected, atol=1e-6)
        assert fired == {"a"}
        # Mask 0 on subcomponent 1: layer a computes W x − W[:, 1] x_1 + b (by hand), then the rest of the model.
        hand_a = x @ model.a.weight.T - x[:, 1:2] * model.a.weight[:, 1] + model.a.bias
        with masked_forward(model, comps, {"a": torch.tensor([1.0, 0.0, 1.0])}):
            assert torch.allclose(model(x), model.b(torch.relu(hand_a)), atol=1e-6)
        # A per-input mask: row 0 keeps everything, the others lose everything but the bias.
        mask = torch.zeros(5, 3)
        mask[0] = 1
        with masked_forward(model, comps, {"a": mask}):
            out = model(x)
        assert torch.allclose(out[0], expected[0], atol=1e-6)
        assert torch.allclose(out[1:], model.b(torch.relu(model.a.bias)).expand(4, 2), atol=1e-6)
    assert torch.equal(model(x), expected)  # the hooks are gone


def test_delta_component_adds_the_residual_scaled_per_input():
    """With the first two subcomponents only (subcomponent 2 removed from the weight), the residual Δ = W[:, 2] e_2ᵀ
    comes back scaled by each input's m_Δ: layer a computes Σ_c m_c h_c U[c] + m_Δ Δ x + b (by hand)."""
    torch.manual_seed(1)
    model, x = TwoLayer(), torch.randn(4, 3)
    comps = _exact(model)
    with torch.no_grad():
        comps[module_key("a")].U[2] = 0
        residual = model.a.weight - comps[module_key("a")].weight()
        assert torch.allclose(residual[:, :2], torch.zeros(4, 2))
        scale = torch.tensor([0.0, 0.25, 1.0, 0.5])
        mask = torch.tensor([1.0, 0.5, 1.0])
        hand_a = (x[:, 0:1] * model.a.weight[:, 0] + 0.5 * x[:, 1:2] * model.a.weight[:, 1]
                  + scale[:, None] * x[:, 2:3] * model.a.weight[:, 2] + model.a.bias)
        with masked_forward(model, comps, {"a": mask}, {"a": (residual, scale)}):
            assert torch.allclose(model(x), model.b(torch.relu(hand_a)), atol=1e-6)


def test_embedding_components_read_rows_and_weight_is_the_transpose():
    model = nn.Sequential(nn.Embedding(6, 3))
    comps = make_components(model, ["0"], 4, torch.Generator().manual_seed(1))
    layer = comps[module_key("0")]
    tokens = torch.tensor([[0, 5, 2]])
    with torch.no_grad():
        assert torch.allclose(layer(tokens), layer.weight().T[tokens], atol=1e-6)
        assert layer.weight().shape == (3, 6)
        mats = layer.matrices()
        assert torch.allclose(mats.sum(0), layer.weight(), atol=1e-6)
        assert torch.linalg.matrix_rank(mats[2]) == 1


def test_bad_targets_and_C_are_refused():
    model = TwoLayer()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(InterplabError, match="not a linear weight"):
        make_components(model, ["c"], 3, gen)
    with pytest.raises(InterplabError, match="C must be >= 1"):
        make_components(model, ["a"], 0, gen)


def test_a_forward_that_bypasses_the_module_is_refused():
    class Bypass(TwoLayer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.a.weight, self.a.bias)

    model = Bypass()
    comps = make_components(model, ["a"], 3, torch.Generator().manual_seed(0))
    with pytest.raises(InterplabError, match="never calls a as a module"):
        check_masks_apply(model, comps, ["a"], torch.randn(2, 3))
