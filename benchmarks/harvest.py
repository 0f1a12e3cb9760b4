"""Harvest throughput on SmolLM2-135M against a bare truncated forward (and TransformerLens, when installed).

    python benchmarks/harvest.py [--batches 24] [--rounds 3]

All three read `blocks.6.hook_resid_post` from the same python-docs batches of 16 x 128 tokens:
- interplab: `harvest()` end to end (tokenising, forward with early stop, cast, sha256, atomic shard writes);
- bare: the HF model with its layer list cut to blocks 0..6, called directly (no hooks, nothing written);
- TransformerLens: `TransformerBridge.run_with_cache(..., names_filter=hook, stop_at_layer=7)` (nothing written).
Each is timed over `rounds` interleaved rounds after a warm-up batch; the best round of each counts. The last line
printed is one JSON object with the figures and `ratio_vs_bare`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from common import take_batches, truncated

from interplab.activations.harvest import HarvestConfig, harvest
from interplab.data import iter_contexts
from interplab.models import load_model
from interplab.models.load import _gguf_cache_dir, smollm2_gguf_path

LAYER, BATCH, CTX = 6, 16, 128
HOOK = f"blocks.{LAYER}.hook_resid_post"


def time_bare(model, batches: list[torch.Tensor]) -> float:
    with truncated(model.model.model, LAYER + 1) as base, torch.inference_mode():
        base(input_ids=batches[0], use_cache=False)  # warm-up
        start = time.perf_counter()
        for tokens in batches:
            base(input_ids=tokens, use_cache=False).last_hidden_state.to("cpu")
        return len(batches) * BATCH * CTX / (time.perf_counter() - start)


def time_interplab(model, n_batches: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        warm = HarvestConfig(model=model.info.spec, hooks=[HOOK], tokens=BATCH * CTX, ctx_len=CTX,
                             batch_size=BATCH, out=f"{tmp}/warm")
        harvest(warm, model, progress=False)
        cfg = HarvestConfig(model=model.info.spec, hooks=[HOOK], tokens=n_batches * BATCH * CTX, ctx_len=CTX,
                            batch_size=BATCH, out=f"{tmp}/store")
        return harvest(cfg, model, progress=False).tokens_per_s


def load_transformerlens():
    """A TransformerLens bridge over the same dequantized weights (None when TransformerLens is not installed)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_cache_dir(smollm2_gguf_path())  # the dequantized HF folder interplab cached: no hub access
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return TransformerBridge.boot_transformers(str(folder), hf_model=hf_model,
                                               tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")


def time_transformerlens(bridge, batches: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        bridge.run_with_cache(batches[0], names_filter=[HOOK], stop_at_layer=LAYER + 1)  # warm-up
        start = time.perf_counter()
        for tokens in batches:
            bridge.run_with_cache(tokens, names_filter=[HOOK], stop_at_layer=LAYER + 1)
        return len(batches) * BATCH * CTX / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=24, help="batches of 16 x 128 tokens per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best counts)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model("smollm2-135m", device="cpu")
    contexts = iter_contexts("python-docs", model.tokenizer, CTX)  # the same stream harvest() reads
    batches = take_batches(contexts, BATCH, args.batches)

    bridge = load_transformerlens()
    interplab_runs, bare_runs, tl_runs = [], [], []
    for round_ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every method alike
        bare_runs.append(time_bare(model, batches))
        interplab_runs.append(time_interplab(model, args.batches))
        if bridge is not None:
            tl_runs.append(time_transformerlens(bridge, batches))
        tl_text = f"{tl_runs[-1]:,.0f} tok/s" if tl_runs else "not installed"
        print(f"round {round_}: bare {bare_runs[-1]:,.0f} tok/s, interplab {interplab_runs[-1]:,.0f} tok/s, "
              f"transformerlens {tl_text}", flush=True)

    interplab_tok_s, bare_tok_s, tl = max(interplab_runs), max(bare_runs), max(tl_runs, default=None)
    print(json.dumps({
        "bench": "harvest",
        "model": "smollm2-135m",
        "hook": HOOK,
        "batch": f"{BATCH}x{CTX}",
        "tokens_per_round": args.batches * BATCH * CTX,
        "interplab_tok_s": round(interplab_tok_s, 1),
        "bare_tok_s": round(bare_tok_s, 1),
        "ratio_vs_bare": round(interplab_tok_s / bare_tok_s, 3),
        "transformerlens_tok_s": None if tl is None else round(tl, 1),
        "ratio_vs_transformerlens": None if tl is None else round(interplab_tok_s / tl, 3),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
