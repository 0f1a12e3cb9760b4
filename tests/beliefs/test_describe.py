"""`interplab beliefs msp`: the exact description of a process."""

from __future__ import annotations

import json
import math

import pytest

from interplab.beliefs import describe
from interplab.beliefs.configs import MSPConfig
from interplab.beliefs.describe import describe_process
from interplab.errors import InterplabError
from interplab.runs import run_settings


def test_golden_mean_numbers_match_closed_forms(tmp_path):
    out = describe_process(MSPConfig(process="golden_mean", depth=6, entropy_length=4, out=str(tmp_path)))
    # π = (1, p)/(1 + p) = (2/3, 1/3) at p = 1/2; P(token 0) = π_0 p = 1/3; h_μ = H(1/2)/(1 + 1/2) = 2/3 bit
    assert out["stationary"] == pytest.approx([2 / 3, 1 / 3])
    assert out["token_distribution"] == pytest.approx([1 / 3, 2 / 3])
    assert out["entropy_rate_bits"]["value"] == pytest.approx(2 / 3, abs=1e-9)
    h1 = -(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3)
    assert out["myopic_entropy_bits"][0] == pytest.approx(h1)
    assert out["myopic_entropy_nats"][0] == pytest.approx(h1 * math.log(2))
    # beliefs: π, then after a 0 the state is known (state 1), after a 1 ... the MSP closes with 3 states
    assert out["msp"]["closed"] and out["msp"]["distinct_states"] == 3
    assert max(abs(complex(*e)) for e in out["msp"]["eigenvalues"]) == pytest.approx(1.0)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["kind"] == out["kind"] == "beliefs msp" and saved["msp"] == out["msp"]
    assert out["figures"]["simplex"] == f"{tmp_path}/figures/simplex.png"
    assert (tmp_path / "figures" / "simplex.png").read_bytes()[:4] == b"\x89PNG"
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config == {"kind": "beliefs msp", "config": run_settings(out["config"])}


def test_rrxor_has_36_belief_states_and_mess3_never_closes(tmp_path):
    rr = describe_process(MSPConfig(process="rrxor", depth=8, out=str(tmp_path / "rr")))
    assert rr["msp"]["distinct_states"] == 36 and rr["msp"]["closed"]
    m3 = describe_process(MSPConfig(process="mess3", depth=4, entropy_length=3, out=str(tmp_path / "m3")))
    assert m3["msp"]["new_states_per_depth"] == [1, 3, 9, 27, 81] and not m3["msp"]["closed"]
    assert "eigenvalues" not in m3["msp"]  # a truncated MSP has no meaningful spectrum


def test_bad_depth_is_a_clear_error(tmp_path):
    with pytest.raises(InterplabError, match="--depth must be >= 1"):
        describe_process(MSPConfig(depth=0, out=str(tmp_path)))


def test_bad_process_touches_no_folder(tmp_path):
    with pytest.raises(InterplabError):
        describe_process(MSPConfig(process="no-such-process", out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_foreign_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InterplabError, match="not empty and holds no interplab beliefs msp run"):
        describe_process(MSPConfig(process="golden_mean", depth=3, out=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_rerun_reports_the_saved_run_and_another_config_is_refused(tmp_path, monkeypatch):
    cfg = MSPConfig(process="golden_mean", depth=3, entropy_length=2, out=str(tmp_path))
    first = describe_process(cfg)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    def no_recompute(*args, **kwargs):
        raise AssertionError("a complete run was recomputed")

    monkeypatch.setattr(describe, "mixed_state_presentation", no_recompute)
    assert describe_process(MSPConfig(process="golden_mean", depth=3, entropy_length=2, out=str(tmp_path))) == first
    assert first == json.loads((tmp_path / "metrics.json").read_text())
    with pytest.raises(InterplabError, match=r"differs in: config\.entropy_length 2 → 3\)"):
        describe_process(MSPConfig(process="golden_mean", depth=3, entropy_length=3, out=str(tmp_path)))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files  # nothing rewritten
