"""torchrun harvest: 2 ranks x 1 thread against 1 rank x 2 threads, SmolLM2-135M on python-docs, on this machine.

    python benchmarks/harvest_ddp.py [--tokens 65536] [--hook blocks.6.hook_resid_post]

Both runs are `interplab.activations.harvest` with the same settings into fresh folders (the GGUF is dequantised
and cached before timing). tokens/s is the harvest's own figure: tokens written over wall time from opening the
store to the end (for two ranks: rank 0's time to the end of the merge, which every rank leaves together). Model
loading is excluded, and so is the tokeniser's first pass over the corpus (it reads the corpus once to fail early).
Both stores are then compared row for row. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import run_ranks


def worker(args: argparse.Namespace) -> None:
    """One rank: harvest, and (rank 0) write the figures to --result."""
    import torch

    from interplab.activations.harvest import HarvestConfig, harvest
    from interplab.distributed import ranks

    cfg = HarvestConfig(hooks=[args.hook], tokens=args.tokens, out=args.out, contexts_per_shard=64)
    result = harvest(cfg, progress=False)
    if ranks().is_main:
        Path(args.result).write_text(json.dumps({
            "world_size": ranks().world_size, "threads": torch.get_num_threads(), "tokens": result.n_tokens,
            "seconds": result.seconds, "tokens_per_s": result.tokens_per_s}))


def run(args: argparse.Namespace, tmp: Path, world: int) -> dict:
    """Harvest once with `world` ranks of 2 // world threads each; return rank 0's figures and the store."""
    out, result = tmp / f"acts-{world}", tmp / f"result-{world}.json"
    script = [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--result", str(result),
              "--tokens", str(args.tokens), "--hook", args.hook]
    return {**run_ranks(script, world, result), "out": str(out)}


def same_rows(a: str, b: str, hook: str) -> bool:
    """Whether two stores read back the same rows and tokens in the same order."""
    import torch

    from interplab.activations import ActivationStore

    pairs = zip(ActivationStore(a).iter_contexts([hook]), ActivationStore(b).iter_contexts([hook]), strict=True)
    return all(torch.equal(x[key], y[key]) for x, y in pairs for key in (hook, "tokens"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from interplab.models import load_model

    load_model("smollm2-135m")  # dequantise and cache the GGUF once, outside the timings
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        one, two = run(args, tmp, 1), run(args, tmp, 2)
        identical = same_rows(one["out"], two["out"], args.hook)
    figures = {
        "bench": "harvest_ddp",
        "one_rank_tok_s": round(one["tokens_per_s"]),
        "two_rank_tok_s": round(two["tokens_per_s"]),
        "ratio": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
        "tokens": one["tokens"],
        "stores_identical": identical,
    }
    print(f"1 rank x 2 threads: {figures['one_rank_tok_s']:,} tok/s; 2 ranks x 1 thread: "
          f"{figures['two_rank_tok_s']:,} tok/s (ratio {figures['ratio']}); stores identical: {identical}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
