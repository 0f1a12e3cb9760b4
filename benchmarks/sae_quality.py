"""TopK SAE quality at equal training tokens and equal L0: interplab's trainer against SAELens's, held-out FVU.

    interplab harvest --hooks blocks.6.hook_resid_post --tokens 393216 --split train --out TRAIN
    interplab harvest --hooks blocks.6.hook_resid_post --tokens 65536 --split test --out TEST
    python benchmarks/sae_quality.py --train TRAIN --test TEST [--k 32] [--expansion 16] [--batch-size 1024] [--lr 3e-4]

Both SAEs see the same shuffled batches of the train store (same seed), the same number of tokens, the same k (so
L0 is k for both), the same width and the same Adam learning rate (`--lr`, default SAELens's 3e-4: in runs this
short the learning rate moves FVU more than anything else, so it is held equal). Everything else is each library's
default, as a user gets it: interplab's `interplab sae train` (linear decay over the last 20%, activation
normalisation folded on save, b_dec at the geometric median, AuxK), and SAELens's TopK training SAE with its runner
defaults (constant learning rate, its own initialisation, `expected_average_only_in` normalisation, gradient
clipping at 1, dead window of 1,000 steps for AuxK). FVU is measured on the held-out store in raw activation space:
FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖². The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from interplab.activations import ActivationStore


def held_out_fvu(encode_decode, test: ActivationStore, hook: str) -> tuple[float, float]:
    """(FVU, mean L0) of `encode_decode(x) -> (x_hat, latents)` over every row of the test store."""
    err = total = 0.0
    n = 0
    l0 = 0.0
    mean = torch.zeros(test.d(hook), dtype=torch.float64)
    for x in test.iter_batches(hook, 4096, shuffle=False):
        mean += x.double().sum(0)
        n += len(x)
    mean /= n
    with torch.no_grad():
        for x in test.iter_batches(hook, 4096, shuffle=False):
            x_hat, latents = encode_decode(x.float())
            err += (x - x_hat).double().pow(2).sum().item()
            total += (x.double() - mean).pow(2).sum().item()
            l0 += (latents != 0).sum().item()
    return err / total, l0 / n


def train_interplab(args: argparse.Namespace, out: str) -> tuple[object, float]:
    from interplab.sae import load_sae
    from interplab.sae.train_config import TrainConfig
    from interplab.sae.trainer import train

    start = time.perf_counter()
    train(TrainConfig(store=args.train, arch="topk", k=[args.k], expansion=[args.expansion], tokens=args.tokens,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, out=out), progress=False)
    seconds = time.perf_counter() - start
    return load_sae(f"{out}/topk-k{args.k}-x{args.expansion}"), seconds


def train_saelens(args: argparse.Namespace, train: ActivationStore, hook: str) -> tuple[object, float, float]:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    d_in = train.d(hook)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_in * args.expansion, k=args.k, device="cpu"))
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr, betas=(0.9, 0.999))
    # expected_average_only_in: scale so the mean norm is sqrt(d_in), estimated on the first batches
    norms = [x.float().norm(dim=-1).mean() for x, _ in zip(train.iter_batches(hook, args.batch_size, seed=args.seed),
                                                           range(50))]
    scale = d_in**0.5 / torch.stack(norms).mean().item()
    since_fired = torch.zeros(sae.cfg.d_sae)
    start = time.perf_counter()
    seen = 0
    for step, x in enumerate(train.iter_batches(hook, args.batch_size, seed=args.seed, drop_last=True)):
        if seen >= args.tokens:
            break
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x.float() * scale, coefficients={}, dead_neuron_mask=since_fired > 1000,
            n_training_steps=step, is_logging_step=False))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().sum(0).bool()
            since_fired += 1
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        seen += len(x)
    return sae.eval(), scale, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True, help="train activation store")
    parser.add_argument("--test", required=True, help="held-out activation store (same hook)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=None, help="training tokens (default: the whole train store)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of both trainers")
    args = parser.parse_args()
    train, test = ActivationStore(args.train), ActivationStore(args.test)
    hook = train.hooks[0]
    args.tokens = args.tokens or train.n_tokens // args.batch_size * args.batch_size
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        ours, ours_s = train_interplab(args, tmp)
    fvu, l0 = held_out_fvu(lambda x: (ours(x), ours.encode(x)), test, hook)
    print(f"interplab: FVU {fvu:.4f}, L0 {l0:.1f}, trained in {ours_s:.0f} s", flush=True)

    theirs, scale, theirs_s = train_saelens(args, train, hook)
    fvu_ref, l0_ref = held_out_fvu(lambda x: (theirs.decode(theirs.encode(x * scale)) / scale,
                                              theirs.encode(x * scale)), test, hook)
    print(f"SAELens: FVU {fvu_ref:.4f}, L0 {l0_ref:.1f}, trained in {theirs_s:.0f} s", flush=True)
    print(json.dumps({
        "bench": "sae_quality", "hook": hook, "k": args.k, "d_sae": train.d(hook) * args.expansion,
        "train_tokens": args.tokens, "batch_size": args.batch_size, "lr": args.lr, "test_tokens": test.n_tokens,
        "interplab_fvu": round(fvu, 5), "interplab_l0": round(l0, 2), "interplab_train_s": round(ours_s, 1),
        "saelens_fvu": round(fvu_ref, 5), "saelens_l0": round(l0_ref, 2), "saelens_train_s": round(theirs_s, 1),
        "fvu_ratio": round(fvu / fvu_ref, 4),
    }))


if __name__ == "__main__":
    main()
