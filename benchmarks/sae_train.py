"""SAE training throughput: interplab against SAELens on the same data and config, and against the matmul peak.

    python benchmarks/sae_train.py [--steps 6] [--rounds 2]

Fixed random activations (d_in=576, 16x expansion = 9,216 latents, batch 4,096, seeded), two architectures:
TopK (k=32) and standard ReLU + L1. A step is everything a training step does. interplab's is the trainer's own
`SAERun.train_step` (forward, loss, backward, decoder-gradient projection, fused Adam, decoder renormalisation,
dead-latent counters, metric sums); SAELens's is its `SAETrainer._train_step` body (forward, loss, firing
statistics, backward, gradient clipping, Adam, zero_grad). SAELens comes from the `bench` extra.

The matmul peak is the best rate of `[4096, 576] @ [576, 9216]` and its transposed forms in this run. The L1 step
needs five such matmuls (encoder forward, decoder forward, dW_dec, df, dW_enc), so
`l1_flop_utilisation = 5 * 2 * B * d_in * d_sae / step_time / peak`. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

D_IN, EXPANSION, BATCH, K = 576, 16, 4096, 32
D_SAE = D_IN * EXPANSION


def matmul_peak_gflops(repeats: int = 5) -> float:
    """Best GFLOP/s over the three matmul shapes an SAE step uses."""
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(BATCH, D_IN, generator=gen), torch.randn(D_IN, D_SAE, generator=gen),
               torch.randn(BATCH, D_SAE, generator=gen))
    shapes = [lambda: x @ w, lambda: g @ w.T, lambda: x.T @ g]
    best = 0.0
    for fn in shapes:
        fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = max(best, 2 * BATCH * D_IN * D_SAE / (time.perf_counter() - start) / 1e9)
    return best


def time_steps(step: Callable[[torch.Tensor], None], batches: list[torch.Tensor], rounds: int) -> float:
    """Best tokens/s over `rounds` passes of `step` over `batches` (after one warm-up step)."""
    step(batches[0])
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for x in batches:
            step(x)
        best = max(best, len(batches) * BATCH / (time.perf_counter() - start))
    return best


def interplab_step(arch: str) -> Callable[[torch.Tensor], None]:
    """The trainer's own step (`SAERun.train_step`): forward, loss, backward, gradient projection, fused Adam,
    decoder renormalisation, dead-latent counters and metric sums."""
    from interplab.sae import SAEConfig
    from interplab.sae.sae_run import SAERun

    run = SAERun(arch, SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, l1_coefficient=5.0), "cpu", 2e-4, seed=0)
    run.sae.initialize(torch.randn(BATCH, D_IN, generator=torch.Generator().manual_seed(1)), seed=0)

    def step(x: torch.Tensor) -> None:
        total_var = (x - x.mean(0)).pow(2).sum()
        run.train_step(x, total_var, lr=2e-4, sparsity=1.0, dead_window=10_000_000)

    return step


def saelens_step(arch: str) -> Callable[[torch.Tensor], None] | None:
    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        return None
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device="cpu"))
        coefficients: dict[str, float] = {}
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=5.0,
                                                            device="cpu"))
        coefficients = {"l1": 5.0}
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    since_fired = torch.zeros(D_SAE)

    def step(x: torch.Tensor) -> None:
        dead = since_fired > 10_000
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        with torch.no_grad():  # what SAETrainer._train_step does besides forward/backward/step
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds (best counts)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(BATCH, D_IN, generator=gen) for _ in range(args.steps)]

    peak = matmul_peak_gflops()
    print(f"matmul peak: {peak:.1f} GFLOP/s", flush=True)
    figures: dict[str, float | None] = {}
    for arch, name in (("topk", "topk"), ("relu", "l1")):
        figures[f"{name}_tok_s"] = time_steps(interplab_step(arch), batches, args.rounds)
        reference = saelens_step(arch)
        figures[f"saelens_{name}_tok_s"] = None if reference is None else time_steps(reference, batches, args.rounds)
        print(f"{name}: interplab {figures[f'{name}_tok_s']:,.0f} tok/s, SAELens "
              f"{figures[f'saelens_{name}_tok_s'] or float('nan'):,.0f} tok/s", flush=True)

    def ratio(name: str) -> float | None:
        ref = figures[f"saelens_{name}_tok_s"]
        return None if ref is None else round(figures[f"{name}_tok_s"] / ref, 3)

    l1_step_s = BATCH / figures["l1_tok_s"]
    print(json.dumps({
        "bench": "sae_train",
        "d_in": D_IN, "d_sae": D_SAE, "batch": BATCH, "k": K,
        "topk_tok_s": round(figures["topk_tok_s"], 1),
        "saelens_topk_tok_s": figures["saelens_topk_tok_s"] and round(figures["saelens_topk_tok_s"], 1),
        "topk_ratio": ratio("topk"),
        "l1_tok_s": round(figures["l1_tok_s"], 1),
        "saelens_l1_tok_s": figures["saelens_l1_tok_s"] and round(figures["saelens_l1_tok_s"], 1),
        "l1_ratio": ratio("l1"),
        "matmul_gflops": round(peak, 1),
        "l1_flop_utilisation": round(5 * 2 * BATCH * D_IN * D_SAE / l1_step_s / 1e9 / peak, 3),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
