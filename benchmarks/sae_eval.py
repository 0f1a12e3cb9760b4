"""SAE evaluation cost against the minimal work it needs, on SmolLM2-135M with an SAE at a middle layer.

    python benchmarks/sae_eval.py [--tokens 4096] [--layer 15]

The evaluation splices the SAE and every control (zero and mean ablation, ε-random, both norm-matched patches,
covariance-matched error) at one hook. Its minimal work is one bare prefix pass (the HF model cut after the hook's
block) plus one bare suffix pass per spliced activation (the clean one included, since the prefix stops at the
hook): the remaining HF decoder layers, the final norm and the unembedding, called directly on the same tokens.
Both are timed in this run on the same batches; `overhead = eval_s / minimal_s` (goal ≤ 1.25). The SAE is a TopK
SAE initialised from the model's activations (its quality does not change the cost). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import take_batches, truncated

from interplab.data import iter_contexts
from interplab.evals.configs import EvalConfig
from interplab.evals.sae_eval import VARIANTS, evaluate
from interplab.models import load_model
from interplab.sae import SAEConfig, make_sae

BATCH, CTX = 8, 128


def minimal_seconds(model, batches: list[torch.Tensor], layer: int, n_suffixes: int) -> float:
    """Bare prefix (blocks 0..layer) plus `n_suffixes` bare suffixes (blocks layer+1.., norm, unembedding)."""
    base = model.model.model
    captured: dict = {}

    def keep_kwargs(_module, args, kwargs):
        captured["kwargs"] = dict(kwargs)

    handle = base.layers[layer + 1].register_forward_pre_hook(keep_kwargs, with_kwargs=True)
    with torch.inference_mode():
        base(input_ids=batches[0], use_cache=False)  # warm-up, and the per-block inputs (mask, rotary) to reuse
    handle.remove()
    layers, norm = base.layers, base.norm
    lm_head = model.model.get_output_embeddings()
    start = time.perf_counter()
    with torch.inference_mode():
        for tokens in batches:
            with truncated(base, layer + 1):
                resid = base(input_ids=tokens, use_cache=False).last_hidden_state
            for _ in range(n_suffixes):
                h = resid
                for block in layers[layer + 1 :]:
                    h = block(h, **captured["kwargs"])
                lm_head(norm(h))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="evaluated tokens (whole batches of 8 x 128)")
    parser.add_argument("--layer", type=int, default=15, help="middle layer of SmolLM2's 30")
    args = parser.parse_args()
    torch.manual_seed(0)
    hook = f"blocks.{args.layer}.hook_resid_post"
    model = load_model("smollm2-135m", device="cpu")
    n_batches = max(1, args.tokens // (BATCH * CTX))
    contexts = iter_contexts("python-docs", model.tokenizer, CTX, split="test")
    batches = take_batches(contexts, BATCH, n_batches)

    sample = model.run_with_cache(batches[0], [hook]).cache[hook].flatten(0, 1)
    sae = make_sae(SAEConfig(arch="topk", d_in=model.info.d_model, d_sae=16 * model.info.d_model, k=32,
                             hook_name=hook, model="smollm2-135m"))
    sae.initialize(sample, seed=0)
    sae.eval()
    cfg = EvalConfig(sae="(initialised TopK)", model="smollm2-135m", hook=hook, split="test",
                     tokens=n_batches * BATCH * CTX, ctx_len=CTX, batch_size=BATCH)
    evaluate(EvalConfig(**{**cfg.__dict__, "tokens": BATCH * CTX}), sae=sae, model=model, progress=False)  # warm-up
    start = time.perf_counter()
    result = evaluate(cfg, sae=sae, model=model, progress=False)
    eval_s = time.perf_counter() - start
    n_suffixes = len(VARIANTS) + 1  # every variant plus the clean run
    minimal_s = minimal_seconds(model, batches, args.layer, n_suffixes)
    print(f"eval {eval_s:.1f} s, minimal {minimal_s:.1f} s ({n_suffixes} suffixes per batch)", flush=True)
    print(json.dumps({
        "bench": "sae_eval", "model": "smollm2-135m", "hook": hook, "tokens": n_batches * BATCH * CTX,
        "eval_s": round(eval_s, 2), "minimal_s": round(minimal_s, 2), "variants": len(VARIANTS),
        "overhead": round(eval_s / minimal_s, 3), "eval_tok_s": round(n_batches * BATCH * CTX / eval_s, 1),
        "kl_ratio": result["metrics"]["model_behavior"]["kl_ratio"],
    }))


if __name__ == "__main__":
    main()
