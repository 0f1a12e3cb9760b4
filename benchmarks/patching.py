"""Activation patching of every head's output on SmolLM2-135M: interplab against TransformerLens, and attribution
patching against interplab's activation patching.

    python benchmarks/patching.py [--pairs 16] [--rounds 1] [--threads N]

The sweep: denoising (run the corrupted prompt, patch in the clean one's activation) of each of the 30 × 9 heads'
`attn.hook_z` at all positions — patching z_h is patching head h's output z_h W_O[h] — on IOI pairs, the metric
being the logit difference logit(answer) − logit(wrong) at the last position. All three methods see the same
token batches (16 pairs per batch) in float32 in this one process:
- interplab: `activation_patch` (one prefix per layer, then only the blocks from the patched one on);
- TransformerLens: `transformer_lens.patching.get_act_patch_attn_head_out_all_pos` on a `TransformerBridge` over
  the same dequantized weights (one full forward pass per patch), or, where it does not accept the bridge, the
  `run_with_hooks` loop a TransformerLens user writes; its clean cache is computed inside the timed region, as
  interplab's source cache is;
- attribution patching (`attribution_patch`, AtP with the QK fix): one source pass, one forward + backward.
Each is warmed up once on 2 pairs, then timed on all pairs; with `--rounds` > 1 the rounds are interleaved and the
best counts. The raw metric values (not normalised) are compared cell by cell. The last line printed is one JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import torch
from harvest import load_transformerlens
from scipy.stats import spearmanr

from interplab.circuits.attribution import attribution_patch
from interplab.circuits.metrics import MetricTargets, PairMetric, make_metric
from interplab.circuits.nodes import Grid, sweep_grids
from interplab.circuits.patching import activation_patch, direction_runs
from interplab.circuits.prompts import PairBatch, load_pairs
from interplab.models import load_model
from interplab.models.hooked import HookedModel

GRID = "head_out"


def take(pairs: PairBatch, n: int) -> PairBatch:
    """The first `n` pairs."""
    return PairBatch(pairs.clean[:n], pairs.corrupted[:n], pairs.null[:n], pairs.answer[:n], pairs.wrong[:n],
                     pairs.template[:n])


def pair_metric(model: HookedModel, pairs: PairBatch) -> PairMetric:
    with torch.inference_mode():
        clean_logits = model.forward(pairs.clean)[:, -1]
    return make_metric("logit-diff", MetricTargets(pairs.answer, pairs.wrong, clean_logits))


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ---- the three methods: each returns raw metric values [n_pairs, n_layers, n_heads] ----------------------------
def run_interplab(model: HookedModel, pairs: PairBatch, grids: list[Grid], metric: PairMetric,
                  batch: int) -> torch.Tensor:
    runs = direction_runs("denoise", pairs.clean, pairs.corrupted)
    with torch.inference_mode():
        return activation_patch(model, runs, grids, metric, batch_size=batch)[GRID]


def run_attribution(model: HookedModel, pairs: PairBatch, grids: list[Grid], metric: PairMetric) -> torch.Tensor:
    return attribution_patch(model, pairs.corrupted, pairs.clean, grids, metric)[GRID].detach()


def z_hooks(n_layers: int) -> list[str]:
    return [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]


def run_tl_patching(bridge, pairs: PairBatch, metric: PairMetric, batch: int) -> torch.Tensor:
    """`transformer_lens.patching.get_act_patch_attn_head_out_all_pos`, batch by batch. Its metric must return a
    scalar, so ours returns the batch mean and keeps the per-pair values, in the function's (layer, head) order."""
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    out = torch.empty(len(pairs.clean), n_layers, n_heads)
    with torch.inference_mode():
        for rows in chunks(len(pairs.clean), batch):
            _, cache = bridge.run_with_cache(pairs.clean[rows], names_filter=z_hooks(n_layers))
            chunk_metric, kept = metric.rows(rows), []

            def scalar_metric(logits: torch.Tensor) -> torch.Tensor:
                values = chunk_metric(logits)
                kept.append(values.float().cpu())
                return values.mean()

            means = get_act_patch_attn_head_out_all_pos(bridge, pairs.corrupted[rows], cache, scalar_metric)
            per_pair = torch.stack(kept, 1).reshape(-1, n_layers, n_heads)
            # the function's own output is the mean of what we kept, cell by cell, if our order is its order
            if not torch.allclose(per_pair.mean(0), means.cpu(), atol=1e-5):
                raise RuntimeError("TransformerLens iterated the heads in an order this benchmark did not expect")
            out[rows] = per_pair
    return out


def run_tl_loop(bridge, pairs: PairBatch, metric: PairMetric, batch: int) -> torch.Tensor:
    """The loop a TransformerLens user writes: per layer and head, `run_with_hooks` with head h of z replaced."""
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    out = torch.empty(len(pairs.clean), n_layers, n_heads)
    with torch.inference_mode():
        for rows in chunks(len(pairs.clean), batch):
            _, cache = bridge.run_with_cache(pairs.clean[rows], names_filter=z_hooks(n_layers))
            chunk_metric = metric.rows(rows)
            for layer in range(n_layers):
                name = f"blocks.{layer}.attn.hook_z"
                for head in range(n_heads):
                    def patch(z: torch.Tensor, hook, head: int = head, name: str = name) -> torch.Tensor:
                        z = z.clone()
                        z[:, :, head] = cache[name][:, :, head]
                        return z

                    logits = bridge.run_with_hooks(pairs.corrupted[rows], fwd_hooks=[(name, patch)])
                    out[rows, layer, head] = chunk_metric(logits).float().cpu()
    return out


def warm_up_tl(bridge, warm: PairBatch, metric: PairMetric, batch: int) -> tuple[str, Callable]:
    """Warm up on `warm` with TransformerLens's own patching function if it runs on the bridge, else with the
    run_with_hooks loop; return the one used."""
    try:
        run_tl_patching(bridge, warm, metric, batch)
        return "transformer_lens.patching.get_act_patch_attn_head_out_all_pos", run_tl_patching
    except Exception as error:  # noqa: BLE001 - any failure of the library function means: use the loop
        print(f"transformer_lens.patching does not run on the bridge ({type(error).__name__}: {error}); "
              "using the run_with_hooks loop", flush=True)
        run_tl_loop(bridge, warm, metric, batch)
        return "run_with_hooks loop", run_tl_loop


def check_hook_z_parity(model: HookedModel, bridge, tokens: torch.Tensor) -> float:
    """Max |z_ours − z_bridge| over every layer on `tokens`: both must patch the same activation."""
    names = z_hooks(model.info.n_layers)
    with torch.inference_mode():
        ours = model.run_with_cache(tokens, names).cache
        _, theirs = bridge.run_with_cache(tokens, names_filter=names)
    return max(float((ours[n] - theirs[n].to(ours[n].device)).abs().max()) for n in names)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """Wall-clock and CPU seconds of `fn()` (CPU time counts this process's threads only, so it is less disturbed
    by other processes on a shared machine, though not immune: they still evict caches and steal cores from
    threads that wait for one another), and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=16, help="IOI prompt pairs")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds (best counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--batch", type=int, default=16, help="pairs per batch, for every method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = load_model("smollm2-135m", device="cpu", dtype="float32")
    bridge = load_transformerlens()
    if bridge is None:
        raise SystemExit("this benchmark needs transformer-lens (pip install transformer-lens)")
    pairs = load_pairs(model, "ioi", args.pairs, args.seed)
    n_pos = pairs.clean.shape[1]
    grids = sweep_grids(model.info, "heads", n_pos)
    metric = pair_metric(model, pairs)
    with torch.inference_mode():
        clean_m, corrupted_m = metric(model.forward(pairs.clean)), metric(model.forward(pairs.corrupted))
    accuracy = float((clean_m > 0).float().mean())
    parity = check_hook_z_parity(model, bridge, pairs.corrupted[: args.batch])
    print(f"{args.pairs} pairs of {n_pos} tokens (IOI, templates {sorted(set(pairs.template))}); "
          f"logit diff clean {clean_m.mean():.3f} (accuracy {accuracy:.2f}), corrupted {corrupted_m.mean():.3f}; "
          f"hook_z max |ours - bridge| {parity:.2e}; "
          f"{len(grids[0].nodes)} patches per pair; torch threads {torch.get_num_threads()}", flush=True)

    warm = take(pairs, 2)
    warm_metric = metric.rows(slice(0, 2))
    seconds, _, _ = timed(lambda: run_interplab(model, warm, grids, warm_metric, args.batch))
    print(f"warm-up on 2 pairs: interplab {seconds:.1f} s", flush=True)
    start = time.perf_counter()
    tl_method, run_tl = warm_up_tl(bridge, warm, warm_metric, args.batch)
    print(f"warm-up on 2 pairs: transformerlens {time.perf_counter() - start:.1f} s ({tl_method})", flush=True)
    seconds, _, _ = timed(lambda: run_attribution(model, warm, grids, warm_metric))
    print(f"warm-up on 2 pairs: attribution {seconds:.2f} s", flush=True)

    methods = {"interplab": lambda: run_interplab(model, pairs, grids, metric, args.batch),
               "transformerlens": lambda: run_tl(bridge, pairs, metric, args.batch),
               "attribution": lambda: run_attribution(model, pairs, grids, metric)}
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, torch.Tensor] = {}
    for round_ in range(args.rounds):  # interleaved, so that a slow spell of the shared machine hits all alike
        for name, fn in methods.items():
            seconds, cpu_seconds, results[name] = timed(fn)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            print(f"round {round_}: {name} {seconds:.2f} s wall, {cpu_seconds:.2f} s cpu, load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)

    ours, theirs, atp = results["interplab"], results["transformerlens"], results["attribution"]
    ours_s, tl_s, atp_s = (min(wall[k]) for k in methods)
    ours_cpu, tl_cpu, atp_cpu = (min(cpu[k]) for k in methods)
    max_diff = float((ours - theirs).abs().max())
    # per-node effect: the mean over pairs of each head's raw metric (the normalisation is monotone, so the same
    # ranks as the normalised effect)
    spearman = float(spearmanr(ours.mean(0).flatten().numpy(), atp.mean(0).flatten().numpy()).statistic)
    print(json.dumps({
        "bench": "patching",
        "model": "smollm2-135m",
        "sweep": "heads (attn.hook_z, all positions), denoise, logit-diff",
        "pairs": args.pairs,
        "positions": n_pos,
        "patches_per_pair": len(grids[0].nodes),
        "batch": args.batch,
        "rounds": args.rounds,
        "prompts": "load_pairs(model, \"ioi\", pairs, seed)",
        "seed": args.seed,
        "transformerlens_method": tl_method,
        "interplab_s": round(ours_s, 3),
        "transformerlens_s": round(tl_s, 3),
        "speedup_vs_tl": round(tl_s / ours_s, 3),
        "max_abs_diff_vs_tl": max_diff,
        "atp_s": round(atp_s, 3),
        "atp_speedup": round(ours_s / atp_s, 2),
        "atp_spearman": round(spearman, 4),
        "interplab_cpu_s": round(ours_cpu, 3),
        "transformerlens_cpu_s": round(tl_cpu, 3),
        "speedup_vs_tl_cpu": round(tl_cpu / ours_cpu, 3),
        "atp_cpu_s": round(atp_cpu, 3),
        "hook_z_parity": parity,
        "clean_accuracy": accuracy,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
