"""Attribution graph of one prompt on SmolLM2-135M: interplab's against circuit-tracer 0.5.0's, same transcoders.

    bash benchmarks/make_circuit_tracer_venv.sh             # once: circuit-tracer's own virtualenv
    python benchmarks/attribution.py [--transcoders DIR | --clt] [--prompt "..."] [--batch-size 256]

The dictionary (the last line's "dictionary"):
- "trained-plt": `--transcoders DIR`, a folder `load_transcoder_set` reads (interplab's set folder in any layout it
  reads, or a circuit-tracer folder), one transcoder per layer (30) — e.g. interplab-trained transcoders; a folder
  holding a cross-layer transcoder is run as one ("trained-clt");
- "random-plt" (default): random JumpReLU transcoders for bring-up (`--d-sae` latents, default 9,216, encoder and
  decoder directions uniformly random, one threshold per layer set so that about `--active` latents fire per token
  on this prompt);
- "random-clt": `--clt`, a random JumpReLU cross-layer transcoder made the same way (`--d-sae` latents per layer,
  default 1,024 here: its decoders hold d_sae · d_model · L(L+1)/2 floats, 1.1 GB at 1,024; each feature's
  decoder into every later layer a random direction, the concatenation of unit norm).
They are written in circuit-tracer's layout with interplab's `save_circuit_tracer` (TopK ones as the JumpReLU of
their k-th largest pre-activation: `--topk-threshold`); circuit-tracer 0.5.0 reads a CLT folder
(config.yaml + W_enc_{i}/W_dec_{i}.safetensors) with its `load_clt`.

- circuit-tracer: `benchmarks/refs/circuit_tracer_graph.py` in its virtualenv (a subprocess), nnsight backend, on a
  local HF folder of the same weights whose config.json carries `rope_theta` (transformers <= 4.57 reads the rope
  base from there); `attribute()` timed, its graph saved as plain tensors.
- interplab: `interplab.graphs.attribution.attribute` on the loaded model, timed the same way (model and
  transcoder loading not timed on either side).

Both get the same token ids (BOS first; neither gives position 0 feature nodes). Compared: the active features
(layer, position, latent), and the edge weights A[target, source] on the edges both graphs have (non-zero in both,
nodes matched by identity: feature (layer, pos, latent), error (layer, pos), token pos, logit token id), as
max |a − b| / |b| over edges with |b| ≥ `--edge-floor` · max|b| (below that, float32 rounding of a sum of ~10^4
terms dominates the relative figure). Scores are interplab's (`graph_scores`). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from interplab.graphs.attribution import AttributionGraph, attribute
from interplab.graphs.scores import graph_scores
from interplab.models import load_model
from interplab.models.load import _gguf_cache_dir, smollm2_gguf_path
from interplab.sae import SAEConfig
from interplab.sae.circuit_tracer_files import save_circuit_tracer
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.registry import make_sae
from interplab.sae.transcoder import Transcoder, TranscoderSet
from interplab.sae.transcoder_files import load_transcoder_set

IN_HOOK, OUT_HOOK = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"
PROMPT = "The Eiffel Tower is in Paris, the capital of"  # 12 tokens with BOS
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "interplab" / "venvs" / "circuit-tracer"
RUNNER = Path(__file__).parent / "refs" / "circuit_tracer_graph.py"


@torch.no_grad()
def random_transcoders(model, tokens: torch.Tensor, d_sae: int, active: int, seed: int = 0) -> dict[int, Transcoder]:
    """Random JumpReLU transcoders, one per layer: unit-norm random encoder columns and decoder rows, zero biases,
    and per layer one threshold θ between the (active · positions)-th and the next largest pre-activation on this
    prompt's non-BOS positions (so about `active` latents fire per token)."""
    gen = torch.Generator().manual_seed(seed)
    n_layers, d = model.info.n_layers, model.info.d_model
    cache = model.run_with_cache(tokens, [IN_HOOK.format(layer=i) for i in range(n_layers)]).cache
    out = {}
    for layer in range(n_layers):
        sae = make_sae(SAEConfig(arch="jumprelu", d_in=d, d_sae=d_sae, apply_b_dec_to_input=False,
                                 hook_name=IN_HOOK.format(layer=layer)))
        W_enc = torch.randn(d, d_sae, generator=gen)
        sae.W_enc.copy_(W_enc / W_enc.norm(dim=0))
        W_dec = torch.randn(d_sae, d, generator=gen)
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        pre = cache[IN_HOOK.format(layer=layer)][0, 1:] @ sae.W_enc
        sae.log_threshold.fill_(math.log(midway_threshold(pre, active)))
        out[layer] = Transcoder(sae.eval(), OUT_HOOK.format(layer=layer))
    return out


def midway_threshold(pre: torch.Tensor, active: int) -> float:
    """θ between the (active · positions)-th and the next largest pre-activation of [positions, d_sae] (midway, so
    that no pre-activation sits at θ, where rounding would decide)."""
    top = pre.flatten().topk(active * pre.shape[0] + 1).values
    return float(((top[-2] + top[-1]) / 2).clamp_min(1e-6))


@torch.no_grad()
def random_clt(model, tokens: torch.Tensor, d_sae: int, active: int, seed: int = 0) -> CrossLayerTranscoder:
    """A random JumpReLU CLT: unit-norm random encoder columns, each feature's decoder into every later layer a
    random direction (the concatenation over output layers of unit norm), zero biases, and per layer the threshold
    of `midway_threshold` on this prompt's non-BOS positions (so about `active` latents fire per token per layer)."""
    gen = torch.Generator().manual_seed(seed)
    n_layers, d = model.info.n_layers, model.info.d_model
    clt = CrossLayerTranscoder(n_layers, d, d_sae, activation="jumprelu", in_hook=IN_HOOK, out_hook=OUT_HOOK)
    cache = model.run_with_cache(tokens, [IN_HOOK.format(layer=i) for i in range(n_layers)]).cache
    clt.b_enc.zero_()
    clt.b_dec.zero_()
    for layer in range(n_layers):
        W_enc = torch.randn(d, d_sae, generator=gen)
        clt.W_enc[layer].copy_(W_enc / W_enc.norm(dim=0))
        W_dec = torch.randn(d_sae, n_layers - layer, d, generator=gen)
        clt.W_dec[layer].copy_(W_dec / W_dec.flatten(1).norm(dim=1)[:, None, None])
        pre = clt.pre_acts(layer, cache[IN_HOOK.format(layer=layer)][0, 1:])
        clt.threshold[layer].fill_(midway_threshold(pre, active))
    return clt.eval()


def load_dictionary(path: str) -> dict[int, Transcoder] | CrossLayerTranscoder:
    """The per-layer transcoders (or the cross-layer transcoder) in folder `path`."""
    loaded = load_transcoder_set(path)
    return loaded if isinstance(loaded, CrossLayerTranscoder) else dict(loaded.transcoders)


def hf_folder_for_old_transformers(dest: Path) -> Path:
    """The dequantized SmolLM2 folder interplab caches, its files linked into `dest`, with two edits transformers
    4.57 needs: `rope_theta` at the top level of config.json (transformers 5 writes it only under rope_parameters;
    4.57 would fall back to 10,000), and tokenizer_config.json naming `PreTrainedTokenizerFast` (5's
    `TokenizersBackend` does not exist in 4.57; both read the same tokenizer.json)."""
    src = _gguf_cache_dir(smollm2_gguf_path())
    dest.mkdir(parents=True, exist_ok=True)
    edited = {"config.json", "tokenizer_config.json"}
    for f in src.iterdir():
        if f.name not in edited:
            (dest / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config["rope_theta"] = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta"))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return dest


def run_circuit_tracer(args: argparse.Namespace, hf_dir: Path, ct_dir: Path, tokens: torch.Tensor, out: Path) -> dict:
    python = Path(args.venv) / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no circuit-tracer virtualenv at {args.venv}: "
                         "run bash benchmarks/make_circuit_tracer_venv.sh")
    cmd = [str(python), str(RUNNER), "--model", str(hf_dir), "--transcoders", str(ct_dir), "--out", str(out),
           "--tokens", ",".join(str(int(t)) for t in tokens[0]), "--batch-size", str(args.batch_size)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of interplab's environment leaks in
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"circuit-tracer failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_keys(n_feat_idx: torch.Tensor, n_layers: int, n_pos: int, logit_ids: torch.Tensor) -> list[tuple]:
    """Identity of each node in [features, errors (layer-major), tokens, logits] order."""
    keys: list[tuple] = [("f", *map(int, row)) for row in n_feat_idx]
    keys += [("err", layer, pos) for layer in range(n_layers) for pos in range(n_pos)]
    keys += [("emb", pos) for pos in range(n_pos)]
    keys += [("logit", int(t)) for t in logit_ids]
    return keys


KINDS = ("f", "err", "emb", "logit")


def compare(ours: AttributionGraph, ref: dict, edge_floor: float) -> dict:
    """Active features and edge weights of the two graphs, nodes matched by identity; edges compared a block of
    target rows at a time (the matrices are ~10^4 x 10^4)."""
    rep = ours.rep
    our_feats = torch.stack([rep.feat_layer, rep.feat_pos, rep.feat_index], 1).cpu()
    ref_feats = ref["active_features"][ref["selected_features"]]
    our_keys = node_keys(our_feats, ours.n_layers, ours.n_pos, ours.logit_ids)
    ref_keys = node_keys(ref_feats, ref["n_layers"], ours.n_pos, ref["logit_ids"])
    ref_index = {k: i for i, k in enumerate(ref_keys)}
    shared = [(i, ref_index[k]) for i, k in enumerate(our_keys) if k in ref_index]
    ours_i, ref_i = torch.tensor([i for i, _ in shared]), torch.tensor([j for _, j in shared])
    kind = torch.tensor([KINDS.index(our_keys[i][0]) for i in ours_i.tolist()])
    floor = edge_floor * float(ref["adjacency_matrix"].abs().max())
    counts = dict.fromkeys(("both", "kept", "only_ours", "only_ref"), 0)
    worst = torch.zeros(len(KINDS), len(KINDS), dtype=torch.float64)  # [target kind, source kind]
    max_abs = 0.0
    for start in range(0, len(ours_i), 1024):
        rows = slice(start, start + 1024)
        a = ours.adjacency[ours_i[rows]][:, ours_i].double()
        b = ref["adjacency_matrix"][ref_i[rows]][:, ref_i].double()
        both = (a != 0) & (b != 0)
        kept = both & (b.abs() >= floor)
        counts["both"] += int(both.sum())
        counts["kept"] += int(kept.sum())
        counts["only_ours"] += int(((a != 0) & (b == 0)).sum())
        counts["only_ref"] += int(((a == 0) & (b != 0)).sum())
        max_abs = max(max_abs, float((a - b).abs().max()))
        rel = torch.where(kept, (a - b).abs() / b.abs(), 0)
        for t in kind[rows].unique().tolist():
            t_rows = rel[kind[rows] == t]
            for s_kind in kind.unique().tolist():
                worst[t, s_kind] = max(worst[t, s_kind], t_rows[:, kind == s_kind].max())
    set_ours = {k for k in our_keys if k[0] == "f"}
    set_ref = {k for k in ref_keys if k[0] == "f"}
    act_ours = dict(zip(map(tuple, our_feats.tolist()), rep.feat_act.tolist()))
    act_ref = dict(zip(map(tuple, ref_feats.tolist()), ref["activation_values"][ref["selected_features"]].tolist()))
    act_diff = max((abs(act_ours[k] - act_ref[k]) / max(abs(act_ref[k]), 1e-12) for k in set(act_ours) & set(act_ref)),
                   default=None)
    return {
        "active_features_interplab": len(set_ours), "active_features_circuit_tracer": len(set_ref),
        "active_features_shared": len(set_ours & set_ref), "activation_max_rel_diff": act_diff,
        "same_logits": [int(t) for t in ours.logit_ids] == [int(t) for t in ref["logit_ids"]],
        "edges_both": counts["both"], "edges_compared": counts["kept"], "edges_only_interplab": counts["only_ours"],
        "edges_only_circuit_tracer": counts["only_ref"],
        "edge_max_rel_diff": float(worst.max()) if counts["kept"] else None,
        "edge_max_rel_diff_by_kind": {f"{KINDS[s]}->{KINDS[t]}": float(worst[t, s]) for t in range(len(KINDS))
                                      for s in range(len(KINDS)) if worst[t, s] > 0},
        "edge_max_abs_diff": max_abs, "edge_floor_abs": floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transcoders", default=None, help="transcoder set folder (default: random, bring-up)")
    parser.add_argument("--clt", action="store_true", help="a random JumpReLU cross-layer transcoder instead")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--d-sae", type=int, default=None,
                        help="random dictionaries: latents per layer (default 9216; 1024 with --clt)")
    parser.add_argument("--active", type=int, default=32, help="random transcoders: latents firing per token")
    parser.add_argument("--topk-threshold", type=float, default=None,
                        help="exporting TopK transcoders: the JumpReLU threshold circuit-tracer gets")
    parser.add_argument("--batch-size", type=int, default=256, help="target nodes per backward pass (both)")
    parser.add_argument("--edge-floor", type=float, default=1e-4, help="compare edges with |w| >= this x max|w|")
    parser.add_argument("--venv", default=str(VENV), help="circuit-tracer's virtualenv")
    parser.add_argument("--keep", default=None, help="folder to keep the exported transcoders and both graphs in")
    args = parser.parse_args()
    if args.clt and args.transcoders:
        parser.error("--clt makes a random cross-layer transcoder; --transcoders reads one: give one of them")
    args.d_sae = args.d_sae or (1024 if args.clt else 9216)

    model = load_model("smollm2-135m", device="cpu")
    tok = model.tokenizer
    tokens = torch.tensor([[tok.bos_token_id, *tok(args.prompt, add_special_tokens=False)["input_ids"]]])
    print(f"prompt: {tokens.shape[1]} tokens (BOS first)", flush=True)
    if args.transcoders:
        transcoders = load_dictionary(args.transcoders)
        is_clt = isinstance(transcoders, CrossLayerTranscoder)
        dictionary, described = ("trained-clt" if is_clt else "trained-plt"), args.transcoders
    elif args.clt:
        transcoders = random_clt(model, tokens, args.d_sae, args.active)
        dictionary, described = "random-clt", f"random jumprelu CLT {args.d_sae} latents/layer, ~{args.active} active"
    else:
        transcoders = random_transcoders(model, tokens, args.d_sae, args.active)
        dictionary, described = "random-plt", f"random jumprelu {args.d_sae} latents, ~{args.active} active"
    to_save = transcoders if isinstance(transcoders, CrossLayerTranscoder) else TranscoderSet(transcoders, IN_HOOK,
                                                                                               OUT_HOOK)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        ct_dir = work / "circuit_tracer_transcoders"
        save_circuit_tracer(to_save, str(ct_dir), "smollm2-135m", topk_threshold=args.topk_threshold)
        hf_dir = hf_folder_for_old_transformers(work / "hf_smollm2")
        ref_info = run_circuit_tracer(args, hf_dir, ct_dir, tokens, work / "circuit_tracer_graph.pt")
        ref = torch.load(work / "circuit_tracer_graph.pt", weights_only=True)
        print(f"circuit-tracer: attribute() {ref_info['attribute_s']:.1f} s ({ref_info['n_active']} active features, "
              f"load {ref_info['load_s']:.1f} s)", flush=True)
        if ref["input_tokens"].tolist() != tokens[0].tolist():
            raise SystemExit(f"circuit-tracer attributed other tokens: {ref['input_tokens'].tolist()}")

        start = time.perf_counter()
        ours = attribute(model, transcoders, tokens, batch_size=args.batch_size)
        ours_s = time.perf_counter() - start
        if args.keep:
            rep = ours.rep
            torch.save({"adjacency": ours.adjacency, "logit_ids": ours.logit_ids, "feat_act": rep.feat_act,
                        "features": torch.stack([rep.feat_layer, rep.feat_pos, rep.feat_index], 1)},
                       work / "interplab_graph.pt")
    print(f"interplab: attribute() {ours_s:.1f} s ({ours.n_features} active features)", flush=True)

    cmp = compare(ours, ref, args.edge_floor)
    scores = graph_scores(ours.adjacency, ours.logit_probs, n_features=ours.n_features,
                          n_errors=ours.n_layers * ours.n_pos, n_tokens=ours.n_pos)
    print(json.dumps(cmp), flush=True)
    print(json.dumps({
        "bench": "attribution",
        "interplab_s": round(ours_s, 2), "circuit_tracer_s": ref_info["attribute_s"],
        "speedup": round(ref_info["attribute_s"] / ours_s, 3),
        "edge_max_rel_diff": cmp["edge_max_rel_diff"],
        "replacement_score": round(scores.replacement, 5), "completeness_score": round(scores.completeness, 5),
        "transcoders": described, "dictionary": dictionary,
        "n_tokens": int(tokens.shape[1]), "active_features": cmp["active_features_interplab"],
        "active_features_circuit_tracer": cmp["active_features_circuit_tracer"],
        "edges_compared": cmp["edges_compared"], "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
