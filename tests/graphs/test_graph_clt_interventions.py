"""Cross-layer transcoders in interventions (zeroing a feature removes its decoded contribution from every later MLP
output), in the norm-matched control, and in `interplab graph`'s run from a circuit-tracer CLT folder."""

from __future__ import annotations

import json

import torch

from graph_toys import exact_clt, exact_set, noisy_clt, prompt, toy
from interplab.graphs.configs import GraphConfig
from interplab.graphs.controls import control_transcoders
from interplab.graphs.interventions import Clamp, intervene, logit_effects
from interplab.graphs.run_graph import run_graph
from interplab.sae.circuit_tracer_files import save_circuit_tracer
from interplab.sae.transcoder import TranscoderSet
from interplab.sae.transcoder_files import save_transcoder_set

IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"

NODE_KEYS = {"id", "type", "layer", "pos", "feature", "activation", "influence", "label", "token", "prob", "dashboard",
             "cumulative"}


def test_zeroing_a_clt_feature_subtracts_its_decoded_contributions_from_every_later_layer():
    model = toy()
    clt = noisy_clt(model)
    tokens = prompt()
    x0 = model.run_with_cache(tokens, ["blocks.0.mlp.hook_in"]).cache["blocks.0.mlp.hook_in"]
    with torch.no_grad():
        acts = clt.encode(0, x0)[0]
    pos, feat = (int(v) for v in (acts == acts.max()).nonzero()[0])  # a firing layer-0 feature
    a = float(acts[pos, feat])

    def subtract(act, name):  # by hand: a · W_dec[0][feat, j] comes out of MLP output j at `pos`, for j = 0, 1, 2
        j = int(name.split(".")[1])
        act = act.clone()
        act[:, pos] -= a * clt.W_dec[0][feat, j].detach()
        return act

    with torch.no_grad():
        want = model.run_with_hooks(tokens, [(f"blocks.{j}.hook_mlp_out", subtract) for j in range(3)])
        clean = model.forward(tokens)
    got = intervene(model, clt, tokens, [Clamp(0, pos, feat, 0.0)])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert (got - clean).abs().max() > 1e-3
    effects = logit_effects(model, clt, tokens, [Clamp(0, pos, feat, 0.0)], [0, 5])
    want_delta = want[0, -1, [0, 5]] - clean[0, -1, [0, 5]]
    torch.testing.assert_close(torch.tensor(effects.delta, dtype=torch.float64), want_delta, atol=1e-12, rtol=0)
    # leaving out the cross-layer part by hand gives another answer: the later layers' terms are in `got`
    with torch.no_grad():
        own_only = model.run_with_hooks(tokens, [("blocks.0.hook_mlp_out", subtract)])
    assert (got - own_only).abs().max() > 1e-3


def test_clamping_a_feature_of_the_mlp_clt_equals_setting_its_neuron():
    model = toy()
    tokens = prompt()

    def set_neuron(act, _name):
        act = act.clone()
        act[:, 3, 2] = 1.5
        return act

    with torch.no_grad():
        want = model.run_with_hooks(tokens, [("blocks.1.mlp.hook_post", set_neuron)])
    torch.testing.assert_close(intervene(model, exact_clt(model), tokens, [Clamp(1, 3, 2, 1.5)]), want, atol=1e-12,
                               rtol=0)


def test_clt_control_keeps_norms_per_output_layer_and_biases_and_randomises_directions():
    model = toy()
    real = noisy_clt(model)
    control = control_transcoders(real, seed=0)
    torch.testing.assert_close(control.W_enc.norm(dim=1), real.W_enc.norm(dim=1))
    for W_c, W in zip(control.W_dec, real.W_dec):
        torch.testing.assert_close(W_c.norm(dim=2), W.norm(dim=2))
        assert torch.nn.functional.cosine_similarity(W_c, W, dim=2).abs().max() < 0.95
    for name in ("b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(control, name), getattr(real, name))
    assert torch.nn.functional.cosine_similarity(control.W_enc, real.W_enc, dim=1).abs().max() < 0.95
    assert torch.equal(control_transcoders(real, seed=0).W_dec[1], control.W_dec[1])
    assert not torch.equal(control_transcoders(real, seed=1).W_dec[1], control.W_dec[1])


def test_graph_run_reads_a_circuit_tracer_clt_folder(tmp_path):
    """What `interplab graph --transcoders DIR` runs (the command line itself is tested in test_graph_cli.py)."""
    model = toy()
    model.save(tmp_path / "model")
    save_circuit_tracer(exact_clt(model), str(tmp_path / "clt"), "toy")
    out = tmp_path / "graph"
    metrics = run_graph(GraphConfig(model=str(tmp_path / "model"), transcoders=str(tmp_path / "clt"),
                                    prompt="3 1 4 1 5 9 2", out=str(out), device="cpu"))
    graph = json.loads((out / "graph.json").read_text())
    assert all(set(n) == NODE_KEYS for n in graph["nodes"])
    ids = {n["id"] for n in graph["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in graph["edges"])
    # the MLPs themselves, stored in float32 and run on the float32 model: errors vanish to rounding
    assert graph["scores"]["completeness"] > 0.999 and graph["scores"]["error_share"] < 1e-3
    assert graph["control"]["completeness"] < graph["scores"]["completeness"] - 0.05
    assert metrics["checks"] and metrics["top_paths"][0]["nodes"][-1] == metrics["top_logit"]
    # the same MLPs as per-layer transcoders: the same graph
    save_transcoder_set(TranscoderSet(exact_set(model), IN, OUT), str(tmp_path / "tc"))
    per_layer = run_graph(GraphConfig(model=str(tmp_path / "model"), transcoders=str(tmp_path / "tc"),
                                      prompt="3 1 4 1 5 9 2", out=str(tmp_path / "graph-tc"), device="cpu"))
    other = json.loads((tmp_path / "graph-tc" / "graph.json").read_text())
    assert [n["id"] for n in other["nodes"]] == [n["id"] for n in graph["nodes"]]
    assert [(e["source"], e["target"]) for e in other["edges"]] == [(e["source"], e["target"]) for e in graph["edges"]]
    torch.testing.assert_close(torch.tensor([e["weight"] for e in graph["edges"]]),
                               torch.tensor([e["weight"] for e in other["edges"]]), atol=1e-4, rtol=1e-4)
    for c, p in zip(metrics["checks"], per_layer["checks"]):
        assert c["node"] == p["node"] and abs(c["model_delta"] - p["model_delta"]) < 1e-4
