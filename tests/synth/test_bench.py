"""`interplab synth bench --quick`: every architecture on both generators, each row beside controls that are
recomputed here independently."""

from __future__ import annotations

import json

import pytest
import torch

from interplab.cli import main
from interplab.synth import random_dictionary, score_dictionary
from interplab.synth.bench import ARCH_SPARSITY, EVAL_SEED_OFFSET
from interplab.synth.specs import make_generator


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["synth", "bench", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_rows_cover_every_architecture_and_ontology(bench):
    out, result = bench
    rows = result["rows"]
    sparse, animals = result["config"]["generators"]
    assert sorted(r["arch"] for r in rows if r["generator"] == sparse) == sorted(ARCH_SPARSITY)
    assert sorted((r["arch"], r["ontology"]) for r in rows if r["generator"] == animals) == sorted(
        (a, o) for a in ARCH_SPARSITY for o in ("animals", "attributes"))
    for r in rows:
        for name in ("learned", "random", "pca"):
            assert 0 <= r[name]["mmcs_true"] <= 1 and 0 <= r[name]["recovery"] <= 1
    assert (out / "bench.md").read_text().startswith("| generator | truth | arch |")
    assert (out / "mmcs_vs_l0.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result["summary"]["best"]) == {f"{sparse}/features", f"{animals}/animals", f"{animals}/attributes"}


def test_random_control_matches_an_independent_score(bench):
    _, result = bench
    row = next(r for r in result["rows"] if r["arch"] == "topk" and r["ontology"] == "features")
    gen = make_generator(row["generator"])
    expected = score_dictionary(random_dictionary(row["d_sae"], gen.features.shape[1], result["config"]["seed"]),
                                gen.features)
    assert row["random"]["mmcs_true"] == pytest.approx(expected["mmcs_true"], abs=1e-6)
    assert row["random"]["recovery"] == expected["recovery"]


def test_held_out_sample_is_not_a_training_batch(bench):
    _, result = bench
    gen = make_generator(result["config"]["generators"][0])
    seed = result["config"]["seed"]
    held_out = gen.sample(4, torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)).x
    first_batches = [b.x for _, b in zip(range(3), gen.batches(4))]
    assert all(not torch.allclose(held_out, b) for b in first_batches)


def test_bad_arch_is_a_one_line_error(tmp_path, capsys):
    assert main(["synth", "bench", "--quick", "--archs", "topk,dense", "--out", str(tmp_path)]) == 2
    assert "unknown --archs ['dense']; valid: relu, topk" in capsys.readouterr().err
