"""`interplab synth bench --quick`: every architecture on both generators, each row beside controls that are
recomputed here independently; the run folder resumes an interrupted bench, reports a complete one, and refuses a
foreign folder or another config."""

from __future__ import annotations

import json

import pytest
import torch

from interplab.cli import main
from interplab.errors import InterplabError
from interplab.synth import bench as bench_module
from interplab.synth import random_dictionary, score_dictionary
from interplab.synth.bench import EVAL_SEED_OFFSET, run_bench
from interplab.synth.configs import ARCH_SPARSITY, SynthBenchConfig
from interplab.synth.specs import make_generator


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["synth", "bench", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


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
    assert result["kind"] == json.loads((out / "config.json").read_text())["kind"] == "synth bench"
    assert (out / "bench.md").read_text().startswith("| generator | truth | arch |")
    assert result["figures"] == {"mmcs_vs_l0": f"{out}/figures/mmcs_vs_l0.png"}
    assert (out / "figures" / "mmcs_vs_l0.png").read_bytes()[:4] == b"\x89PNG"
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


def small(out, **changes) -> SynthBenchConfig:
    """A two-SAE bench (quick, the sparse generator, topk and relu): seconds."""
    return SynthBenchConfig(generators=["sparse"], archs=["topk", "relu"], quick=True, out=str(out), **changes)


def test_foreign_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "bench.json").write_text("{}")  # e.g. an older version's output
    with pytest.raises(InterplabError, match="not empty and holds no interplab synth bench run"):
        run_bench(small(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_interrupted_bench_resumes_then_reports_and_refuses_another_config(tmp_path, monkeypatch):
    real_train, calls = bench_module.train, []

    def interrupted(cfg, **kwargs):  # the second sweep dies before training anything
        if calls:
            raise RuntimeError("killed")
        calls.append(cfg.arch)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(bench_module, "train", interrupted)
    with pytest.raises(RuntimeError, match="killed"):
        run_bench(small(tmp_path), progress=False)
    assert not (tmp_path / "metrics.json").exists() and (tmp_path / "config.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert calls == ["topk"] and finished

    done = []

    def recording(cfg, **kwargs):
        result = real_train(cfg, **kwargs)
        done.append((cfg.arch, result.already_complete))
        return result

    monkeypatch.setattr(bench_module, "train", recording)
    result = run_bench(small(tmp_path), progress=False)
    assert done == [("topk", True), ("relu", False)]  # the finished sweep is not retrained
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert sorted({r["arch"] for r in result["rows"]}) == ["relu", "topk"]
    assert result == json.loads((tmp_path / "metrics.json").read_text())

    def no_training(cfg, **kwargs):
        raise AssertionError("a complete bench was recomputed")

    monkeypatch.setattr(bench_module, "train", no_training)
    assert run_bench(small(tmp_path), progress=False) == result
    saved = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(InterplabError, match=r"differs in: config\.seed 0 → 1\)"):
        run_bench(small(tmp_path, seed=1), progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == saved  # nothing rewritten
