"""APD's faithfulness and simplicity losses by hand (both normalised by the number of weight entries N, as the APD
reference code does), batch top-k, and the random-subset control of the kept loss."""

from __future__ import annotations

import torch
from torch import nn

from interplab.decompose.apd import apd_faithfulness, batch_top_k, n_weights, simplicity_loss
from interplab.decompose.components import make_components, module_key
from interplab.decompose.scores import random_subsets


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(2, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _set(comps: nn.ModuleDict, name: str, U: list[list[float]], V: list[list[float]]) -> None:
    with torch.no_grad():
        comps[module_key(name)].U.copy_(torch.tensor(U))
        comps[module_key(name)].V.copy_(torch.tensor(V))


def test_faithfulness_and_simplicity_are_means_over_the_weight_entries():
    model = Two()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        model.b.weight.zero_()
    comps = make_components(model, ["a", "b"], 2, torch.Generator().manual_seed(0))
    # a: U[0] = (1, 0), V[:, 0] = e0; U[1] = (0, 1), V[:, 1] = e1 → Σ = [[1,0,0],[0,1,0]]: one entry off by 1.
    _set(comps, "a", [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # b: U[0] = (0, 3, 0) (norm 3), V[:, 0] = (0, 2) (norm 2); U[1] = 0 → Σ has one entry 6, against 0.
    _set(comps, "b", [[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0], [2.0, 0.0]])
    assert n_weights(model, ["a", "b"]) == 12
    torch.testing.assert_close(apd_faithfulness(model, comps, ["a", "b"]), torch.tensor((1.0 + 36.0) / 12))
    # Component 0: ‖U‖‖V‖ = 1·1 (a) + 3·2 (b) = 7; component 1: 1·1 + 0 = 1. Two inputs: {0}, {0, 1}.
    active = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = ((7.0) + (7.0 + 1.0)) / 2 / 12
    torch.testing.assert_close(simplicity_loss(comps, ["a", "b"], active, 1.0, 12), torch.tensor(expected))
    # p = 2 squares each layer's singular value: 1 + 36 = 37 and 1.
    torch.testing.assert_close(simplicity_loss(comps, ["a", "b"], active, 2.0, 12),
                               torch.tensor((37.0 + 38.0) / 2 / 12))


def test_batch_top_k_picks_the_largest_entries_of_the_whole_batch():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.8, 0.7]])
    assert batch_top_k(scores, 1.5).tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]


def test_random_subsets_keep_the_count_per_input_and_vary():
    keep = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).repeat(50, 1)
    draw = random_subsets(keep, torch.Generator().manual_seed(0))
    assert torch.equal(draw.sum(-1), keep.sum(-1))
    assert set(draw.unique().tolist()) <= {0.0, 1.0}
    # Uniform places: each of the 4 positions gets the single kept one about 1/4 of the time over 50 rows.
    singles = draw[0::3]
    assert (singles.sum(0) > 3).all()
