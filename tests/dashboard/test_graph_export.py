"""Neuronpedia's graph JSON: a small graph exported and compared with the file written out by hand from
circuit-tracer's conventions (frontend/graph_models.py: node ids, Cantor-paired feature numbers, layer "E" and
n_layers + 1, jsNodeId, clerp of logits; create_graph_files.py: cumulative influence, qParams defaults) and
Neuronpedia's graph-schema.json (required fields)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from interplab import __version__
from interplab.dashboard.graph_export import export_neuronpedia_graph
from interplab.errors import InterplabError


def small_graph() -> dict:
    """Prompt "Hi\\n": emb:1 -> f:0:1:3 -> logit:7, plus an error node; n_layers = 2."""
    def node(nid, kind, layer, pos, influence, **extra):
        return {"id": nid, "type": kind, "layer": layer, "pos": pos, "feature": None, "activation": None,
                "influence": influence, "label": nid, "token": None, "prob": None, "dashboard": None, **extra}
    return {
        "kind": "attribution_graph", "version": 1, "model": "smollm2-135m", "prompt": "Hi\n", "tokens": ["Hi", "\n"],
        "token_ids": [17, 198], "n_layers": 2,
        "nodes": [node("logit:7", "logit", 2, 1, 0.0, token="\tok", prob=0.25, label="logit"),
                  node("err:1:1", "error", 1, 1, 1.0),
                  node("emb:1", "embedding", -1, 1, 1.0, token="\n"),
                  node("f:0:1:3", "feature", 0, 1, 2.0, feature=3, activation=1.5, label="newline")],
        "edges": [{"source": "emb:1", "target": "f:0:1:3", "weight": 0.5},
                  {"source": "f:0:1:3", "target": "logit:7", "weight": -2.0},
                  {"source": "err:1:1", "target": "logit:7", "weight": 0.25}],
        "scores": {"replacement": 0.5, "completeness": 0.75, "error_share": 0.25},
        "control": {"replacement": 0.0, "completeness": 0.5, "error_share": 0.5},
        "pruning": {"node_threshold": 0.8, "edge_threshold": 0.98, "n_nodes_before": 10, "n_edges_before": 20}}


def _common(**kw):
    return {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "",
            "activation": None, **kw}


# Written by hand. Cumulative influence over feature/error/embedding nodes: |2| of 4 -> 0.5, then the two 1s (ties
# by id: "emb:1" < "err:1:1") -> 0.75, 1.0. Cantor(0, 3) = (3 * 4) / 2 + 3 = 9. Logit layer = n_layers + 1 = 3.
EXPECTED = {
    "metadata": {"slug": "hi-newline", "scan": "smollm2-135m", "transcoder_list": [], "prompt_tokens": ["Hi", "\u23ce"],
                 "prompt": "Hi\n", "node_threshold": 0.8, "schema_version": 1,
                 "info": {"generator": {"name": "interplab", "version": __version__}},
                 "pruning_settings": {"node_threshold": 0.8, "edge_threshold": 0.98}},
    "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
    "nodes": [
        _common(node_id="0_3_1", feature=9, layer="0", ctx_idx=1, feature_type="cross layer transcoder",
                jsNodeId="0_3-0", clerp="newline", influence=0.5, activation=1.5),
        _common(node_id="1_-1_1", feature=-1, layer="1", ctx_idx=1, feature_type="mlp reconstruction error",
                jsNodeId="1_1-0", influence=1.0),
        _common(node_id="E_198_1", feature=1, layer="E", ctx_idx=1, feature_type="embedding", jsNodeId="E_198-1",
                influence=0.75),
        _common(node_id="3_7_1", feature=7, layer="3", ctx_idx=1, feature_type="logit", token_prob=0.25,
                is_target_logit=True, jsNodeId="L_7-1", clerp='Output "\u2192ok" (p=0.250)', influence=None),
    ],
    "links": [{"source": "E_198_1", "target": "0_3_1", "weight": 0.5},
              {"source": "0_3_1", "target": "3_7_1", "weight": -2.0},
              {"source": "1_-1_1", "target": "3_7_1", "weight": 0.25}],
}
SCHEMA_REQUIRED = {"top": {"metadata", "qParams", "nodes", "links"},
                   "metadata": {"slug", "scan", "prompt_tokens", "prompt"},
                   "node": {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"},
                   "link": {"source", "target", "weight"}}


def test_exported_file_is_the_hand_written_one(tmp_path: Path) -> None:
    path = tmp_path / "hi-newline.json"
    returned = export_neuronpedia_graph(small_graph(), str(path))
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written == EXPECTED and returned == EXPECTED
    # field by field, so an extra or missing key names itself
    for got, want in zip(written["nodes"], EXPECTED["nodes"]):
        assert sorted(got) == sorted(want)
    assert SCHEMA_REQUIRED["top"] <= set(written) and SCHEMA_REQUIRED["metadata"] <= set(written["metadata"])
    assert all(SCHEMA_REQUIRED["node"] <= set(n) for n in written["nodes"])
    assert all(SCHEMA_REQUIRED["link"] <= set(e) for e in written["links"])


def test_options_and_missing_token_ids(tmp_path: Path) -> None:
    graph = small_graph()
    del graph["token_ids"]
    out = export_neuronpedia_graph(graph, str(tmp_path / "x.json"), slug="my-graph", scan="gemma-2-2b",
                                   transcoder_list=["l0", "l1"])
    assert out["metadata"]["slug"] == "my-graph" and out["metadata"]["scan"] == "gemma-2-2b"
    assert out["metadata"]["transcoder_list"] == ["l0", "l1"]
    assert out["nodes"][2]["node_id"] == "E_-1_1" and out["links"][0]["source"] == "E_-1_1"
    # a graph carrying its own cumulative influence (ranked before pruning) has it written as is
    for n, c in zip(graph["nodes"], (None, 0.875, 0.5, 0.25)):
        n["cumulative"] = c
    out = export_neuronpedia_graph(graph, str(tmp_path / "y.json"))
    assert [n["influence"] for n in out["nodes"]] == [0.25, 0.875, 0.5, None]


@pytest.mark.parametrize("change, kwargs, message", [
    (lambda g: g.update(token_ids=[1]), {}, "token_ids"),
    (lambda g: g["nodes"][0].update(id="logit:x"), {}, "token id"),
    (lambda g: g["nodes"][3].update(feature=None), {}, "feature"),
    (lambda g: None, {"slug": "Bad Slug"}, "slug"),
])
def test_bad_input_writes_nothing(tmp_path: Path, change, kwargs, message) -> None:
    graph = small_graph()
    change(graph)
    if graph["nodes"][0]["id"] == "logit:x":
        for e in graph["edges"]:
            e["target"] = "logit:x" if e["target"] == "logit:7" else e["target"]
    with pytest.raises(InterplabError, match=message):
        export_neuronpedia_graph(graph, str(tmp_path / "g.json"), **kwargs)
    assert not (tmp_path / "g.json").exists()
