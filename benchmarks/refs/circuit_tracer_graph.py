"""Run circuit-tracer's attribution on one prompt and save its graph; runs inside circuit-tracer's own virtualenv
(benchmarks/make_circuit_tracer_venv.sh), started by benchmarks/attribution.py. Imports nothing from interplab.

    VENV/bin/python benchmarks/refs/circuit_tracer_graph.py --model HF_DIR --transcoders CT_DIR
        --tokens 1,504,... --out graph.pt [--batch-size 256] [--max-logits 10] [--logit-prob 0.95]

HF_DIR is a local HF folder that transformers <= 4.57 reads (`rope_theta` at the top level of config.json, a
tokenizer class it knows), CT_DIR a circuit-tracer transcoder folder: config.yaml with model_kind transcoder_set
(layer_{i}.safetensors, read with `load_transcoder_set`) or cross_layer_transcoder (W_enc_{i}/W_dec_{i}.safetensors,
read with `load_clt`, decoders loaded eagerly, not lazily from disk, so that timing measures attribution). The
prompt is given as token ids, so both libraries see the same tokens. The graph goes to `--out` as a dict of plain
tensors (Graph.to_pt's fields); the last line printed is one JSON object with the seconds `attribute()` took
(`attribute_s`) and those of loading (`load_s`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--transcoders", required=True)
    parser.add_argument("--tokens", required=True, help="comma-separated token ids")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-logits", type=int, default=10)
    parser.add_argument("--logit-prob", type=float, default=0.95)
    args = parser.parse_args()

    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    start = time.perf_counter()
    folder = Path(args.transcoders)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    hooks = dict(feature_input_hook=config["feature_input_hook"], feature_output_hook=config["feature_output_hook"])
    cpu = dict(device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    if config["model_kind"] == "cross_layer_transcoder":
        transcoders = load_clt(str(folder), scan=str(folder), **hooks, **cpu)
    else:
        n_layers = len(list(folder.glob("layer_*.safetensors")))
        transcoders = load_transcoder_set({i: str(folder / f"layer_{i}.safetensors") for i in range(n_layers)},
                                          scan=str(folder), **hooks, **cpu)
    model = ReplacementModel.from_pretrained_and_transcoders(args.model, transcoders, backend="nnsight",
                                                             device=torch.device("cpu"), dtype=torch.float32)
    load_s = time.perf_counter() - start

    tokens = torch.tensor([int(t) for t in args.tokens.split(",")])
    start = time.perf_counter()
    graph = attribute(tokens, model, max_n_logits=args.max_logits, desired_logit_prob=args.logit_prob,
                      batch_size=args.batch_size)
    attribute_s = time.perf_counter() - start
    # plain tensors only, so that a process without circuit-tracer (interplab's) can torch.load it
    torch.save({"input_tokens": graph.input_tokens.cpu(), "active_features": graph.active_features.cpu(),
                "activation_values": graph.activation_values.cpu(), "selected_features": graph.selected_features.cpu(),
                "adjacency_matrix": graph.adjacency_matrix.cpu(),
                "logit_ids": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
                "logit_probabilities": graph.logit_probabilities.cpu(), "n_layers": int(model.cfg.n_layers)},
               args.out)
    print(json.dumps({"attribute_s": round(attribute_s, 3), "load_s": round(load_s, 3), "kind": config["model_kind"],
                      "n_active": int(graph.active_features.shape[0]), "n_nodes": int(graph.adjacency_matrix.shape[0]),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
