"""Animals and attributes: the geometry of both dictionaries, both ontologies' truth per sample, and the numbers
of `no_common_dictionary`."""

from __future__ import annotations

import itertools

import pytest
import torch

from interplab.errors import InterplabError
from interplab.synth import Animals, AnimalsConfig, no_common_dictionary

SMALL = {"n_animals": 40, "n_attributes": 8, "attributes_per_animal": 3, "n_independent": 10, "d": 24,
         "animal_mean_active": 2.0, "independent_mean_active": 2.0}


def small(**kw) -> Animals:
    return Animals(AnimalsConfig(**{**SMALL, **kw}))


def test_attribute_directions_are_orthonormal_and_animals_lie_in_their_span():
    gen = small()
    E, A = gen.attribute_directions.double(), gen.animal_directions.double()
    torch.testing.assert_close(E @ E.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(A - (A @ E.T) @ E, torch.zeros_like(A), atol=1e-6, rtol=0)
    torch.testing.assert_close(A @ E.T, gen.membership.double(), atol=1e-6, rtol=0)  # a_j = Σ_k M_jk e_k
    torch.testing.assert_close(A.norm(dim=1), torch.full((40,), 3 ** 0.5, dtype=torch.float64))


def test_independent_directions_are_unit_and_orthogonal_to_the_attributes():
    gen = small()
    G, E = gen.independent_directions.double(), gen.attribute_directions.double()
    torch.testing.assert_close(G @ E.T, torch.zeros(10, 8, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(G.norm(dim=1), torch.ones(10, dtype=torch.float64))


def test_membership_is_binary_with_distinct_rows():
    M = small().membership
    assert bool(((M == 0) | (M == 1)).all()) and bool((M.sum(1) == 3).all())
    assert len({tuple(r.tolist()) for r in M}) == 40


def test_samples_carry_both_ontologies():
    gen = small()
    b = gen.sample(3000, torch.Generator().manual_seed(0))
    assert torch.equal(b.attribute_values, b.animal_coeffs @ gen.membership)
    assert bool((b.animal_coeffs >= 0).all()) and bool((b.animal_coeffs <= 1).all())
    torch.testing.assert_close(b.x, b.animal_coeffs @ gen.animal_directions + b.independent_coeffs
                               @ gen.independent_directions, atol=1e-6, rtol=0)
    for ontology in ("animals", "attributes"):
        dictionary, codes = gen.truth(b, ontology)
        torch.testing.assert_close(codes @ dictionary, b.x, atol=1e-5, rtol=0)
    assert float((b.animal_coeffs != 0).float().sum(1).mean()) == pytest.approx(2.0, abs=0.1)
    assert float((b.independent_coeffs != 0).float().sum(1).mean()) == pytest.approx(2.0, abs=0.1)


def test_batches_are_seeded_and_resumable():
    gen = small()
    full = list(itertools.islice(gen.batches(16), 4))
    tail = list(itertools.islice(small().batches(16, start=2), 2))
    assert all(torch.equal(a.x, b.x) for a, b in zip(full[2:], tail))
    assert not torch.equal(full[0].x, full[1].x)


def test_no_common_dictionary_numbers():
    r = no_common_dictionary(small(), n=1024)
    assert r.animal_error < 1e-5 and r.attribute_error < 1e-5
    assert r.both_error > 0.3                                    # the animal part, counted twice
    assert r.both_error == pytest.approx(r.animal_share, rel=1e-6)
    assert r.split_error < 1e-5 and r.best_decoder_error < 1e-5


def test_no_common_dictionary_ignores_noise_and_needs_no_independents():
    r = no_common_dictionary(small(noise_std=0.5, n_independent=0), n=512)
    assert r.animal_error < 1e-5 and r.attribute_error < 1e-5
    assert r.both_error == pytest.approx(1.0, rel=1e-6)          # x is all animals
    assert r.animal_share == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("kw, shown", [
    ({"attributes_per_animal": 9}, "attributes_per_animal=9 must be <= n_attributes=8"),
    ({"n_animals": 57}, "n_animals=57 exceeds the 56 distinct sets of 3 of 8 attributes"),
    ({"n_attributes": 24}, "n_attributes=24 must be <= d=24 - 1"),
    ({"animal_mean_active": 0.0}, "animal_mean_active must be in (0, n_animals=40], got 0.0"),
    ({"independent_mean_active": 11.0}, "independent_mean_active must be in (0, n_independent=10], got 11.0"),
    ({"n_animals": 0}, "n_animals must be an integer >= 1, got 0"),
    ({"noise_std": -0.1}, "noise_std must be >= 0, got -0.1"),
])
def test_bad_configs_raise_naming_the_value(kw, shown):
    with pytest.raises(InterplabError) as e:
        small(**kw)
    assert shown in str(e.value)


def test_unknown_ontology_lists_the_valid_ones():
    with pytest.raises(InterplabError, match="unknown ontology 'plants'; valid: animals, attributes"):
        small().dictionary("plants")
