"""Toy transformers: OV-coherent pairs (2 heads, and 1 head for d_head 2..5) and grokking, with `toy train` defaults.

    python benchmarks/toys.py [--seeds 3] [--out DIR]

1. ov-coherent, 2 heads, d_head 5 (the task's defaults): read-off accuracy on 4096 held-out sequences.
2. ov-coherent, 1 head, d_head ∈ {2, 3, 4, 5}, seeds 0..SEEDS-1 (single-head training is seed-sensitive: it can
   sit on a plateau): each setting's accuracy is the best over the seeds (can a single head of that width solve
   it?), every seed's accuracy is printed. Same settings for every width; the runs stop 200 steps after passing the
   gate test_acc >= 0.99.
3. modular addition (the task's defaults, grokking): final train / test accuracy, the jump step (the first logged
   step at which the thorough phase's test accuracy is >= 0.5) and the step at which the thorough phase started
   (train accuracy >= 0.99: memorised).

Prints progress, then as its last line {"bench": "toys", "ov_coherent_2h_acc", "single_head_acc_by_dhead",
"single_head_acc_by_seed", "grokking_train_acc", "grokking_test_acc", "grokking_jump_step",
"thorough_phase_start_step", "wall_s"}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from interplab.toy.configs import ToyTrainConfig
from interplab.toy.loop import TrainResult
from interplab.toy.train import format_summary, run_toy_train


def train(out: Path, **settings) -> TrainResult:
    start = time.perf_counter()
    result = run_toy_train(ToyTrainConfig(out=str(out), progress=False, resume=False, **settings))
    final = result.metrics["final"]
    print(f"  {out.name}: test acc {final['test_acc']:.4f} (worst output {final['test_worst_output_acc']:.3f}), "
          f"{result.metrics['steps_trained']} steps, {time.perf_counter() - start:.0f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per single-head setting")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # models this small run fastest on one thread (two contend badly on a busy machine)
    root = Path(args.out or tempfile.mkdtemp(prefix="interplab-toys-"))
    start = time.perf_counter()

    print("ov-coherent, 2 heads, d_head 5", flush=True)
    two = train(root / "ov-2h-d5", task="ov-coherent", heads=2, d_head=5)

    print(f"ov-coherent, 1 head, d_head 2..5, seeds 0..{args.seeds - 1}", flush=True)
    by_dhead: dict[str, float] = {}
    by_seed: dict[str, list[float]] = {}
    for d_head in (2, 3, 4, 5):
        accs = [train(root / f"ov-1h-d{d_head}-s{seed}", task="ov-coherent", heads=1, d_head=d_head, seed=seed,
                      stop_after=200).metrics["final"]["test_acc"] for seed in range(args.seeds)]
        by_dhead[str(d_head)] = round(max(accs), 4)
        by_seed[str(d_head)] = [round(a, 4) for a in accs]
        print(f"  d_head {d_head}: per seed {[round(a, 4) for a in accs]}", flush=True)

    print("modular addition (grokking)", flush=True)
    grok = train(root / "grokking", task="modular-addition")
    print(format_summary(grok), flush=True)
    print(f"runs in {root}", flush=True)
    print(json.dumps({
        "bench": "toys", "ov_coherent_2h_acc": round(two.metrics["final"]["test_acc"], 4),
        "single_head_acc_by_dhead": by_dhead, "single_head_acc_by_seed": by_seed,
        "grokking_train_acc": round(grok.metrics["final"]["train_acc"], 4),
        "grokking_test_acc": round(grok.metrics["final"]["test_acc"], 4),
        "grokking_jump_step": grok.metrics["jump_step"],
        "thorough_phase_start_step": grok.metrics["phase_starts"]["thorough"],
        "wall_s": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
