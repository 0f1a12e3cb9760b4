"""`run_graph` end to end on a toy saved to disk with its exact transcoders: the run folder, graph.json's schema,
the scores beside the control, and bad input refused with nothing written."""

from __future__ import annotations

import json

import pytest

from graph_toys import exact_set, noisy_set, toy
from interplab.errors import InterplabError
from interplab.graphs.configs import GraphConfig
from interplab.graphs.run_graph import run_graph
from interplab.sae.transcoder import TranscoderSet
from interplab.sae.transcoder_files import save_transcoder_set

IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"
NODE_KEYS = {"id", "type", "layer", "pos", "feature", "activation", "influence", "label", "token", "prob", "dashboard",
             "cumulative"}


@pytest.fixture
def saved(tmp_path):
    model = toy()
    model.save(tmp_path / "model")
    save_transcoder_set(TranscoderSet(exact_set(model), IN, OUT), str(tmp_path / "tc"))
    return tmp_path


def test_run_writes_the_graph_and_scores_beside_the_control(saved):
    cfg = GraphConfig(model=str(saved / "model"), transcoders=str(saved / "tc"), prompt="3 1 4 1 5 9 2",
                      out=str(saved / "run"), device="cpu")
    metrics = run_graph(cfg)
    graph = json.loads((saved / "run" / "graph.json").read_text())
    assert graph["kind"] == "attribution_graph" and graph["n_layers"] == 3 and len(graph["tokens"]) == 7
    assert graph["token_ids"] == [3, 1, 4, 1, 5, 9, 2]
    ids = {n["id"] for n in graph["nodes"]}
    assert all(set(n) == NODE_KEYS for n in graph["nodes"])
    assert all(e["source"] in ids and e["target"] in ids for e in graph["edges"])
    assert {f"emb:{p}" for p in range(7)} <= ids and any(n["type"] == "logit" for n in graph["nodes"])
    # exact transcoders (stored in float32 and run on the float32 model): errors vanish to rounding
    assert graph["scores"]["completeness"] > 0.999 and graph["scores"]["error_share"] < 1e-3
    assert graph["control"]["completeness"] < graph["scores"]["completeness"] - 0.05
    assert metrics["scores"] == graph["scores"] and metrics["top_paths"]
    assert metrics["top_paths"][0]["nodes"][-1] == metrics["top_logit"]
    report = (saved / "run" / "report.md").read_text()
    assert "random control" in report and metrics["top_logit"] in report
    assert run_graph(cfg)["scores"] == metrics["scores"]  # a complete run is read back, not redone


def test_bad_input_is_refused_and_nothing_written(saved, tmp_path):
    base = dict(model=str(saved / "model"), prompt="3 1 4", device="cpu")
    with pytest.raises(InterplabError, match="no transcoder set"):
        run_graph(GraphConfig(**base, transcoders=str(saved / "missing"), out=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists()
    model = toy()
    two = {l: t for l, t in noisy_set(model).items() if l < 2}
    with pytest.raises(InterplabError, match="one transcoder per layer"):
        run_graph(GraphConfig(**base, transcoders="x", out=str(tmp_path / "b")), model=model, transcoders=two)
    with pytest.raises(InterplabError, match="exceed the model's context"):
        run_graph(GraphConfig(**{**base, "prompt": "1 " * 40}, transcoders="x", out=str(tmp_path / "c")),
                  model=model, transcoders=exact_set(model))
    with pytest.raises(InterplabError, match="node-threshold"):
        GraphConfig(**base, transcoders="x", node_threshold=2.0).validate()
    assert not any((tmp_path / d).exists() for d in "bc")
