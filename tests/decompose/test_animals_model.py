"""animals-facts: the forward by hand, one rank-1 mechanism per animal summing to each weight, a trained model that
does what no linear map can, and the cache."""

from __future__ import annotations

import pytest
import torch

from interplab.decompose.animals_model import (
    AnimalsFacts,
    AnimalsFactsConfig,
    AnimalsFactsTruth,
    facts,
    load_or_train,
    train_animals_facts,
)
from interplab.decompose.truth import GroundTruthModel
from interplab.errors import InterplabError

SMALL = AnimalsFactsConfig(n_animals=60, n_attributes=16, d=20, n_facts=8, animal_mean_active=1.5, threshold=0.3,
                           steps=150, batch_size=256, lr=2e-2)
"""60 animals in a 16-dim span: the same kind of problem, trained in a few seconds."""


@pytest.fixture(scope="module")
def trained() -> AnimalsFactsTruth:
    return AnimalsFactsTruth(train_animals_facts(SMALL, progress=False), SMALL)


def test_forward_by_hand():
    # detect = [[1, 0], [1, 1]], b = (−0.5, 0); fact = [[2, −1]], b = 0.25. x = (1, −2): detect x + b = (0.5, −1)
    # -> ReLU (0.5, 0) -> 2·0.5 − 0 + 0.25 = 1.25.
    model = AnimalsFacts(d=2, n_animals=2, n_facts=1)
    with torch.no_grad():
        model.detect.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        model.detect.bias.copy_(torch.tensor([-0.5, 0.0]))
        model.fact.weight.copy_(torch.tensor([[2.0, -1.0]]))
        model.fact.bias.fill_(0.25)
    torch.testing.assert_close(model(torch.tensor([[1.0, -2.0]])), torch.tensor([[1.25]]))


def test_true_components_are_one_rank1_mechanism_per_animal_summing_to_each_weight(trained):
    assert isinstance(trained, GroundTruthModel)
    comps = trained.true_components()
    assert list(comps) == trained.targets == ["detect", "fact"]
    for name, T in comps.items():
        W = trained.model.get_submodule(name).weight
        assert T.shape[0] == 60
        torch.testing.assert_close(T.sum(0), W, atol=0, rtol=0)
        assert bool((torch.linalg.matrix_rank(T) == 1).all())
    # Mechanism j of the detectors reads animal j: its only non-zero row is neuron j, equal to a_j (fixed weights).
    A = trained.generator.animal_directions
    torch.testing.assert_close(comps["detect"][torch.arange(60), torch.arange(60)], A)
    torch.testing.assert_close(trained.one_hot_inputs(), A)


def test_trained_model_computes_what_no_linear_map_can(trained):
    losses = trained.losses(20_000, seed=7)
    assert losses.model < 0.6 * losses.linear < 0.6 * losses.zero
    # Each animal alone drives its own neuron hardest (for nearly all: thresholds differ after training).
    H = trained.selectivity()
    assert float((H.argmax(1) == torch.arange(60)).float().mean()) >= 0.9
    # The readout learned each animal's fact in its column.
    cos = torch.nn.functional.cosine_similarity(trained.model.fact.weight.T, facts(SMALL), dim=1)
    assert float(cos.mean()) > 0.8


def test_cache_returns_the_same_weights(tmp_path):
    cfg = AnimalsFactsConfig(**{**SMALL.__dict__, "steps": 5})
    first = load_or_train(cfg, tmp_path, "cpu", progress=False)
    again = load_or_train(cfg, tmp_path, "cpu", progress=False)
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kw, shown", [
    ({"n_facts": 0}, "n_facts must be an integer >= 1, got 0"),
    ({"n_attributes": 30}, "n_attributes=30 must be <= d=20"),
    ({"lr": 0.0}, "threshold must be >= 0 and lr > 0, got 0.3 and 0.0"),
])
def test_bad_configs_raise(kw, shown):
    with pytest.raises(InterplabError) as e:
        AnimalsFactsConfig(**{**SMALL.__dict__, **kw}).validate()
    assert shown in str(e.value)
