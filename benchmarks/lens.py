"""Logit lens and tuned lens on SmolLM2-135M: held-out KL per layer, and the SVD of one head's OV circuit.

    python benchmarks/lens.py [--train-tokens N] [--eval-tokens N] [--out DIR]

1. A tuned lens (every layer but the last; AdamW, bfloat16 readout, see interplab.lens.tuned) is trained on
   python-docs train-split tokens, then both lenses are scored in float32 on test-split tokens. Reported: KL(final ‖
   lens) averaged over the middle third of the layers (layers n/3 … 2n/3 − 1), beside the context-free control (the
   KL of the held-out tokens' mean final distribution). The default budget keeps the whole script (model load
   included) under 10 minutes on a quiet 2-core CPU.
2. SVD timings of one head's OV matrix W_V W_O, factored and dense (`svd_timings`).

Last line: {"bench": "lens", "layers", "logit_lens_kl_mid", "tuned_lens_kl_mid", "factored_svd_s", "dense_svd_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any


def svd_timings(model: Any, layer: int | None = None, head: int = 0, repeats: int = 20) -> dict[str, Any]:
    """Seconds to take the SVD of one attention head's OV matrix W_V W_O [d_model, d_model] through its factored
    form (QR of both factors, SVD of the d_head × d_head middle) and densely (form the product, full thin SVD);
    the median of `repeats` runs each, and the largest singular-value difference between the two."""
    import statistics

    import torch

    from interplab.weights.extract import attention_weights
    from interplab.weights.factored import FactoredMatrix

    layer = model.info.n_layers // 2 if layer is None else layer
    attn = attention_weights(model, layer)
    W_V, W_O = attn.W_V[head].cpu(), attn.W_O[head].cpu()

    def timed(fn: Any) -> tuple[float, Any]:
        times, out = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    factored_s, (_, S_factored, _) = timed(lambda: FactoredMatrix(W_V, W_O).svd())
    dense_s, S_dense = timed(lambda: torch.linalg.svd(W_V @ W_O, full_matrices=False).S)
    rank = S_factored.shape[0]
    return {"factored_svd_s": factored_s, "dense_svd_s": dense_s, "svd_speedup": dense_s / factored_s,
            "svd_max_abs_diff": float((S_factored - S_dense[:rank]).abs().max()), "svd_matrix": f"L{layer}.H{head} OV"}


def middle_third(values: list[float]) -> float:
    n = len(values)
    mid = values[n // 3: 2 * n // 3]
    return sum(mid) / len(mid)


def main() -> None:
    from interplab.models import load_model
    from interplab.lens.run import LensConfig, run_lens

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=2032)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    start = time.perf_counter()
    model = load_model("smollm2-135m", device="cpu")
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LensConfig(kind="tuned", train_tokens=args.train_tokens, eval_tokens=args.eval_tokens,
                         out=args.out or f"{tmp}/lens", device="cpu")
        result = run_lens(cfg, model=model)
    logit, tuned = result["logit_lens"]["kl"], result["tuned_lens"]["kl"]
    n = len(logit)
    print("layer  logit-lens KL  tuned-lens KL")
    for layer in range(n):
        print(f"{layer:>5} {logit[layer]:>14.3f} {tuned[layer]:>14.3f}")
    out = {"bench": "lens", "layers": n, "mid_layers": [n // 3, 2 * n // 3 - 1],
           "logit_lens_kl_mid": middle_third(logit), "tuned_lens_kl_mid": middle_third(tuned),
           "mean_distribution_kl": result["baseline"]["mean_distribution_kl"],
           "logit_lens_kl_last": logit[-1], "trained_layers": len(result["tuned_lens"]["trained_layers"]),
           "train_tokens": result["tuned_lens"].get("train_tokens"), "eval_tokens": result["n_tokens"],
           "train_steps": result["tuned_lens"].get("steps"), "train_s": result["tuned_lens"].get("train_s"),
           "eval_s": result["seconds"]["evaluate"], "load_s": load_s}
    out.update(svd_timings(model))
    out["wall_s"] = time.perf_counter() - start
    print(json.dumps(out))


if __name__ == "__main__":
    main()
