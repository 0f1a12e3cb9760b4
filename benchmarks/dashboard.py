"""Dashboard data for a 9,216-latent SAE over 200k tokens, against the bare forward pass through model and SAE.

    python benchmarks/dashboard.py [--tokens N] [--batch-size B] [--out SITE]

The SAE is a TopK (k=32, 9,216 latents) on SmolLM2-135M's blocks.6.hook_resid_post (d_in 576). It is NOT trained:
its decoder rows are random unit vectors, W_enc = W_decᵀ, and b_dec is the mean activation of the first batch
(`SparseAutoencoder.initialize`), so that it reads centred activations and its k = 32 latents per token vary. That
is enough to time the bookkeeping, whose cost depends on the number of active (token, latent) entries — exactly k
per token for any TopK SAE — not on what the latents mean.

In one run, over the same contexts of python-docs and the same batches:
    forward_s  the reference: every batch through the model up to the hook (the forward pass stops there) and the
               SAE's encode, nothing else; timed once before and once after the build and averaged, since the
               speed of a shared 2-core machine drifts over minutes (both are printed);
    build_s    `build_dashboard_data` from start to end: corpus tokenising, the same forward and encode, the
               streaming statistics, logit effects, correlations, and writing SITE/data/.
The last line is {"bench": "dashboard", "build_s", "forward_s", "overhead" (= build_s / forward_s), ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import torch

from interplab.dashboard.configs import DashboardConfig
from interplab.dashboard.data import build_dashboard_data, collect_contexts, iter_batches, read_batch
from interplab.models.load import load_model
from interplab.sae import SAEConfig, make_sae

HOOK = "blocks.6.hook_resid_post"


def reference(model: Any, sae: Any, contexts: torch.Tensor, batch_size: int) -> float:
    """Seconds to run every batch through the model up to the hook and the SAE's encode, nothing else."""
    start = time.perf_counter()
    for _, batch in iter_batches(contexts, batch_size):
        codes, _ = read_batch(model, sae, HOOK, batch)
    if codes.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="corpus tokens read")
    parser.add_argument("--batch-size", type=int, default=32, help="contexts of 128 tokens per forward pass")
    parser.add_argument("--d-sae", type=int, default=9216, help="latents")
    parser.add_argument("--out", default=None, help="site folder (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="interplab-dashboard-")
    model = load_model("smollm2-135m")
    cfg = DashboardConfig(sae="(random TopK, see benchmarks/dashboard.py)", model="smollm2-135m", hook=HOOK,
                          tokens=args.tokens, batch_size=args.batch_size, out=out)
    sae = make_sae(SAEConfig(arch="topk", d_in=model.info.d_model, d_sae=args.d_sae, k=32, hook_name=HOOK,
                             model="smollm2-135m")).to(model.device).eval()
    contexts = collect_contexts(cfg, model.tokenizer)
    first = model.run_with_cache(contexts[:cfg.batch_size].long().to(model.device), [HOOK]).cache[HOOK]
    sae.initialize(first.reshape(-1, first.shape[-1]))           # also warms up the model's kernels
    before_s = reference(model, sae, contexts, cfg.batch_size)
    start = time.perf_counter()
    summary = build_dashboard_data(cfg, model=model, sae=sae)
    build_s = time.perf_counter() - start
    after_s = reference(model, sae, contexts, cfg.batch_size)
    forward_s = (before_s + after_s) / 2
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in summary.items()
                      if k != "config"}))
    print(json.dumps({"bench": "dashboard", "build_s": round(build_s, 1), "forward_s": round(forward_s, 1),
                      "overhead": round(build_s / forward_s, 3), "tokens": summary["n_tokens"],
                      "forward_before_s": round(before_s, 1), "forward_after_s": round(after_s, 1),
                      "d_sae": args.d_sae, "k": 32, "hook": HOOK, "batch_size": cfg.batch_size,
                      "build_forward_s": round(summary["forward_s"], 1), "stats_s": round(summary["stats_s"], 1),
                      "finalize_s": round(summary["finalize_s"], 1), "write_s": round(summary["write_s"], 1),
                      "setup_s": round(summary["setup_s"], 1), "sae": "random (untrained) TopK", "out": out}))


if __name__ == "__main__":
    main()
