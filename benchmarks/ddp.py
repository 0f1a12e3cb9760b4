"""Data-parallel SAE training: 2 ranks x 1 thread (torchrun, gloo) against 1 rank x 2 threads, on this machine.

    python benchmarks/ddp.py [--steps 40] [--d-in 576] [--expansion 16] [--k 32] [--batch-size 4096]

Both runs are `interplab.sae.trainer.train` on the same store (seeded random activations of SmolLM2's width,
d_in 576, written once into a temporary folder), TopK k=32 with 16x expansion and batch 4,096: the SAE of
benchmarks/sae_train.py. tokens/s is the trainer's own figure (training steps only; initialisation and saving
excluded). The communication share is the time a rank spends in the gradient all-reduce (`reduce_gradients`,
timed inside the real run; it includes waiting for the slower rank) over its training time. The bucket size gives
the communication volume per step, from which BENCHMARKS.md projects 8-GPU scaling. A third run trains the same SAE
latent-sharded (`--shard-latents`, 2 ranks x 1 thread, each holding half the latents and reading the whole batch):
its tokens/s and ratio against the same 1-rank reference are reported beside. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import run_ranks


def write_store(path: Path, d_in: int, tokens: int) -> None:
    """Seeded heavy-tailed random activations (so TopK's choices vary from token to token) as an interplab store."""
    from interplab.activations.writer import StoreWriter

    ctx_len = 128
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(tokens // ctx_len, ctx_len, d_in, generator=gen) ** 3
    with StoreWriter(str(path), config={"model": "random", "d_in": d_in}, hooks=["blocks.0.hook_resid_post"],
                     shapes={"blocks.0.hook_resid_post": (ctx_len, d_in)}, contexts_per_shard=64) as writer:
        writer.add({"blocks.0.hook_resid_post": acts}, torch.zeros(acts.shape[:2], dtype=torch.long))
        writer.finish()


def worker(args: argparse.Namespace) -> None:
    """One rank of a run: train with the all-reduce timed, and (rank 0) write the figures to --result."""
    import interplab.sae.sae_run as sae_run
    from interplab.distributed import ranks
    from interplab.sae.data_parallel import bucket_bytes
    from interplab.sae.train_config import TrainConfig
    from interplab.sae.trainer import train

    comm = {"seconds": 0.0, "calls": 0}
    reduce = sae_run.reduce_gradients

    def timed_reduce(*a, **kw):
        start = time.perf_counter()
        out = reduce(*a, **kw)
        comm["seconds"] += time.perf_counter() - start
        comm["calls"] += 1
        return out

    sae_run.reduce_gradients = timed_reduce
    cfg = TrainConfig(store=args.store, arch="topk", k=[args.k], expansion=[args.expansion],
                      tokens=args.steps * args.batch_size, batch_size=args.batch_size, log_every=args.steps,
                      checkpoint_every=0, normalize=True, b_dec_init="mean", out=args.out,
                      shard_latents=args.shard_latents)
    result = train(cfg, progress=False)
    r = ranks()
    train_seconds = result.tokens / result.tokens_per_s
    if r.is_main:
        sae = next(iter(result.saes.values()))
        Path(args.result).write_text(json.dumps({
            "world_size": r.world_size, "threads": torch.get_num_threads(), "tokens_per_s": result.tokens_per_s,
            "steps": result.steps, "train_seconds": train_seconds, "comm_seconds": comm["seconds"],
            "comm_calls": comm["calls"], "bucket_bytes": None if args.shard_latents else bucket_bytes(sae, 3 + sae.cfg.d_sae),
            "n_params": sum(p.numel() for p in sae.parameters()),
        }))


def run(args: argparse.Namespace, store: Path, tmp: Path, world: int, shard_latents: bool = False) -> dict:
    """Train once with `world` ranks of 2 // world threads each; return rank 0's figures."""
    tag = f"{world}-sharded" if shard_latents else str(world)
    out, result = tmp / f"sae-{tag}", tmp / f"result-{tag}.json"
    script = [str(Path(__file__).resolve()), "--worker", "--store", str(store), "--out", str(out),
              "--result", str(result), "--steps", str(args.steps), "--d-in", str(args.d_in),
              "--expansion", str(args.expansion), "--k", str(args.k), "--batch-size", str(args.batch_size)]
    return run_ranks(script + (["--shard-latents"] if shard_latents else []), world, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard-latents", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        store = tmp / "acts"
        write_store(store, args.d_in, tokens=16 * args.batch_size)
        one, two = run(args, store, tmp, 1), run(args, store, tmp, 2)
        sharded = run(args, store, tmp, 2, shard_latents=True)
    step_bytes = two["bucket_bytes"]
    figures = {
        "bench": "ddp",
        "one_rank_tok_s": round(one["tokens_per_s"]),
        "two_rank_tok_s": round(two["tokens_per_s"]),
        "ratio": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
        "comm_share": round(two["comm_seconds"] / two["train_seconds"], 4),
        "comm_ms_per_step": round(1e3 * two["comm_seconds"] / two["comm_calls"], 2),
        "step_ms_two_ranks": round(1e3 * two["train_seconds"] / two["steps"], 1),
        "step_ms_one_rank": round(1e3 * one["train_seconds"] / one["steps"], 1),
        "bucket_mb_per_step": round(step_bytes / 1e6, 2),
        "n_params": two["n_params"],
        "sharded_two_rank_tok_s": round(sharded["tokens_per_s"]),
        "sharded_ratio": round(sharded["tokens_per_s"] / one["tokens_per_s"], 3),
        "config": {"d_in": args.d_in, "d_sae": args.d_in * args.expansion, "k": args.k,
                   "batch_size": args.batch_size, "steps": args.steps},
    }
    print(f"1 rank x 2 threads: {figures['one_rank_tok_s']:,} tok/s; 2 ranks x 1 thread: "
          f"{figures['two_rank_tok_s']:,} tok/s (ratio {figures['ratio']}); all-reduce {figures['comm_ms_per_step']} "
          f"ms of a {figures['step_ms_two_ranks']} ms step ({figures['comm_share']:.1%}), "
          f"{figures['bucket_mb_per_step']} MB per rank per step; latent-sharded 2 ranks: "
          f"{figures['sharded_two_rank_tok_s']:,} tok/s (ratio {figures['sharded_ratio']})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
