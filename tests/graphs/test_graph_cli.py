"""`interplab graph` and `interplab transcoder eval` from the command line, on a toy with its exact transcoders:
the graph's viewer page and Neuronpedia file beside the run folder (the evaluation's numbers are tested in
tests/evals/test_transcoder_eval.py)."""

from __future__ import annotations

import json

from graph_toys import exact_set, toy
from interplab.cli import main
from interplab.sae.transcoder import TranscoderSet
from interplab.sae.transcoder_files import save_transcoder_set

IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"


def test_graph_and_transcoder_eval_commands(tmp_path, capsys):
    model = toy()
    model.save(tmp_path / "model")
    save_transcoder_set(TranscoderSet(exact_set(model), IN, OUT), str(tmp_path / "tc"))
    out = tmp_path / "graph"
    assert main(["graph", "--model", str(tmp_path / "model"), "--transcoders", str(tmp_path / "tc"),
                 "--prompt", "3 1 4 1 5", "--out", str(out), "--device", "cpu"]) in (0, None)
    graph = json.loads((out / "graph.json").read_text())
    assert graph["scores"]["completeness"] > 0.999  # exact transcoders: nothing flows through error nodes
    assert (out / "page" / "index.html").exists() and (out / "page" / "data" / "graph.js").exists()
    exported = json.loads((out / "neuronpedia-graph.json").read_text())
    assert len(exported["nodes"]) == len(graph["nodes"]) and len(exported["links"]) == len(graph["edges"])
    assert "completeness" in capsys.readouterr().out

    # the toy has no tokenizer: evaluating on a text corpus is refused in one line, before any work
    code = main(["transcoder", "eval", "--model", str(tmp_path / "model"), "--transcoders", str(tmp_path / "tc"),
                 "--ctx-len", "8", "--tokens", "16", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no tokenizer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "eval").exists()
