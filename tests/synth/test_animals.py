"""Animals and attributes: the geometry of both dictionaries (dense default and binary variant), both ontologies'
truth per sample, the binary variant against the earlier generator's saved output, and `no_common_dictionary`."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from interplab.errors import InterplabError
from interplab.synth import Animals, AnimalsConfig, no_common_dictionary
from interplab.synth.bench import _own_scores

SMALL = {"n_animals": 40, "n_attributes": 8, "attributes_per_animal": 3, "n_independent": 10, "d": 24,
         "animal_mean_active": 2.0, "independent_mean_active": 2.0}
REFERENCE = Path(__file__).parent / "data" / "animals_binary_reference.safetensors"
"""Written by the generator as it was before the dense default (git HEAD of 2026-12-08), with SMALL, noise_std=0.1,
seed=3: its dictionaries, `sample(64, Generator().manual_seed(5))` and batch 2 of `batches(8)`."""
DEFAULT_BINARY_SHA256 = "37fc7c8d34dbb900a4f4eba33c3330a2c599cff9ca4abdfeda549e9f8906e1dd"
"""sha256 of the earlier generator's default config (then binary): the bytes of membership, animal_directions,
independent_directions and sample(16, Generator().manual_seed(0)).x, computed by that code before the change with
one torch thread (a 1000-long matmul's rounding depends on the thread count)."""


def small(**kw) -> Animals:
    return Animals(AnimalsConfig(**{**SMALL, "membership": "binary", **kw}))


def test_binary_reproduces_the_earlier_generator_bit_for_bit():
    ref = load_file(str(REFERENCE))
    gen = small(noise_std=0.1, seed=3)
    b = gen.sample(64, torch.Generator().manual_seed(5))
    ours = {"membership": gen.membership, "attribute_directions": gen.attribute_directions,
            "animal_directions": gen.animal_directions, "independent_directions": gen.independent_directions,
            "x": b.x, "animal_coeffs": b.animal_coeffs, "attribute_values": b.attribute_values,
            "independent_coeffs": b.independent_coeffs, "batch2_x": next(gen.batches(8, start=2)).x}
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name


def test_binary_default_sizes_match_the_earlier_generators_digest():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = Animals(AnimalsConfig(membership="binary"))
        h = hashlib.sha256()
        for t in (gen.membership, gen.animal_directions, gen.independent_directions,
                  gen.sample(16, torch.Generator().manual_seed(0)).x):
            h.update(t.numpy().tobytes())
    finally:
        torch.set_num_threads(threads)
    assert h.hexdigest() == DEFAULT_BINARY_SHA256


def test_dense_default_animals_are_generic_unit_vectors_of_the_attribute_span():
    gen = Animals(AnimalsConfig())                          # 1000 animals, K = 50, d = 256
    assert gen.cfg.membership == "dense"
    E, A = gen.attribute_directions.double(), gen.animal_directions.double()
    torch.testing.assert_close(A - (A @ E.T) @ E, torch.zeros_like(A), atol=1e-6, rtol=0)   # inside the span
    torch.testing.assert_close(A.norm(dim=1), torch.ones(1000, dtype=torch.float64), atol=1e-6, rtol=0)
    # For a uniform unit vector of R^K, each coordinate and each inner product with another independent one has
    # mean 0 and variance exactly 1/K: cos(a_j, e_k) = M_jk, cos(a_i, a_j) = M_i·M_j.
    to_attr = (A @ E.T).flatten()
    off = (A @ A.T)[~torch.eye(1000, dtype=torch.bool)]
    for cos in (to_attr, off):
        assert float(cos.mean()) == pytest.approx(0.0, abs=0.01)
        assert float(cos.std()) == pytest.approx(50 ** -0.5, rel=0.05)
    assert float(to_attr.abs().max()) < 0.75 and float(off.abs().max()) < 0.75   # no animal is an attribute


def test_dense_attributes_are_dense_and_animals_sparse():
    gen = Animals(AnimalsConfig())
    b = gen.sample(4000, torch.Generator().manual_seed(1))
    p = 3.0 / 1000
    assert float((b.animal_coeffs != 0).float().mean()) == pytest.approx(p, rel=0.05)
    # An attribute value is non-zero exactly when some animal is active: P = 1 − (1 − p)^A.
    assert float((b.attribute_values != 0).float().mean()) == pytest.approx(1 - (1 - p) ** 1000, abs=0.01)
    assert bool((b.attribute_values < 0).any())             # signed under dense
    for ontology in ("animals", "attributes"):
        dictionary, codes = gen.truth(b, ontology)
        torch.testing.assert_close(codes @ dictionary, b.x, atol=1e-5, rtol=0)


def test_dense_ignores_the_binary_only_limits():
    gen = Animals(AnimalsConfig(**{**SMALL, "n_animals": 57, "attributes_per_animal": 9}))   # > C(8, 3); k > K
    assert gen.membership.shape == (57, 8)


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


@pytest.mark.parametrize("membership", ["binary", "dense"])
def test_no_common_dictionary_numbers(membership):
    r = no_common_dictionary(small(membership=membership), n=1024)
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
    ({"membership": "sparse"}, "membership='sparse' is not one of dense, binary"),
])
def test_bad_configs_raise_naming_the_value(kw, shown):
    with pytest.raises(InterplabError) as e:
        small(**kw)
    assert shown in str(e.value)


def test_unknown_ontology_lists_the_valid_ones():
    with pytest.raises(InterplabError, match="unknown ontology 'plants'; valid: animals, attributes"):
        small().dictionary("plants")


def test_bench_scores_each_ontology_without_the_shared_independent_features():
    gen = small(membership="dense")
    attribute_sae = SimpleNamespace(W_dec=gen.attribute_directions)        # a dictionary that is the attributes
    own = _own_scores(attribute_sae, gen, "attributes", 0.9)
    assert own == {"own_mmcs": pytest.approx(1.0), "own_recovery": 1.0}
    # Against the animals it scores each animal's largest attribute coefficient: max_k |M_jk| (here the sign
    # matters: codes are >= 0, so max_k M_jk), well below 1.
    expected = float(gen.membership.max(dim=1).values.mean())
    assert _own_scores(attribute_sae, gen, "animals", 0.9)["own_mmcs"] == pytest.approx(expected, abs=1e-5)
