"""Transcoder training end to end: interplab (harvest the MLP's input/output pairs + train) against eai-sparsify.

    python benchmarks/transcoder_train.py [--tokens 50000] [--batch-size 4096] [--test-contexts 64]

SmolLM2-135M-Instruct (float32, the dequantized GGUF folder interplab caches), layer 6: a TopK transcoder (k = 32,
9,216 latents) from `blocks.6.mlp.hook_in` (what the MLP reads, ln2's output) to `blocks.6.hook_mlp_out`, on the
same python-docs train contexts of 128 tokens, BOS left out by both (interplab's `exclude_bos`; sparsify's
`exclude_tokens=[bos]`, BOS appearing only at position 0 of each context):

- interplab: `train(TrainConfig(model=..., hook=..., target=..., arch="topk"))` in stream mode, its shuffle buffer
  set to exactly these contexts: every forward pass (stopping after block 6), the shuffle, and training, timed;
  its model load is not. Everything else is interplab's default (Adam 3e-4 unless `--lr`; tied encoder start unless
  `--transcoder-init fitted`).
- sparsify 1.3.3: its Python `Trainer(TrainConfig(SaeConfig(transcode=True, k, num_latents), hookpoints=
  ["layers.6.mlp"], log_to_wandb=False), dataset, model)` over the HF `LlamaModel` (no LM head) cut to blocks 0-6,
  `batch_size` = the same tokens per step in contexts; `Trainer(...)` and `fit()` timed. Everything else is
  sparsify's default (signSGD with schedule-free averaging, lr 5e-3 / sqrt(F / 2^14), no AuxK).

Held-out FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² of the MLP output on `--test-contexts` contexts of the test split (BOS left
out), the pairs read with forward hooks on the HF module `layers[6].mlp` (independent of interplab's hook points,
which are checked against them). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from common import truncated

from interplab.data import iter_contexts
from interplab.sae.sources import StreamSource
from interplab.sae.train_config import TrainConfig
from interplab.sae.transcoder_files import load_transcoder
from interplab.sae.trainer import train

LAYER, K, D_SAE, CTX = 6, 32, 9216, 128
HOOK_IN, HOOK_OUT = f"blocks.{LAYER}.mlp.hook_in", f"blocks.{LAYER}.hook_mlp_out"
MODEL = "smollm2-135m"


def mlp_pairs(base, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the HF module layers[LAYER].mlp for `tokens`, BOS position dropped, as rows."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        seen["in"], seen["out"] = inputs[0].detach(), output.detach()

    handle = base.layers[LAYER].mlp.register_forward_hook(hook)
    try:
        with truncated(base, LAYER + 1), torch.inference_mode():
            base(input_ids=tokens, use_cache=False)
    finally:
        handle.remove()
    return seen["in"][:, 1:].flatten(0, 1).float(), seen["out"][:, 1:].flatten(0, 1).float()


def fvu(predict, x: torch.Tensor, y: torch.Tensor) -> float:
    """Σ‖y − predict(x)‖² / Σ‖y − ȳ‖², in float64."""
    with torch.no_grad():
        err = (y.double() - predict(x).double()).pow(2).sum()
    return (err / (y.double() - y.double().mean(0)).pow(2).sum()).item()


def train_interplab(args: argparse.Namespace, n_contexts: int, out: str) -> tuple[object, int, float, object]:
    """Stream-mode training on the first `n_contexts` train contexts: (predictor, tokens, seconds, the model)."""
    batches = n_contexts * (CTX - 1) // args.batch_size  # one shuffle-buffer fill holds exactly these contexts
    cfg = TrainConfig(model=MODEL, hook=HOOK_IN, target=HOOK_OUT, arch="topk", k=[K], expansion=[D_SAE // 576],
                      tokens=batches * args.batch_size, batch_size=args.batch_size, shuffle_buffer=n_contexts * CTX,
                      ctx_len=CTX, device="cpu", seed=0, out=out, transcoder_init=args.transcoder_init,
                      **({"lr": args.lr} if args.lr else {}))
    source = StreamSource(cfg.model, cfg.hook, cfg.corpus, split=cfg.split, ctx_len=cfg.ctx_len,
                          model_batch_size=cfg.model_batch_size, shuffle_buffer=cfg.shuffle_buffer,
                          batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                          test_fraction=cfg.test_fraction, skip_positions=int(cfg.exclude_bos), target=cfg.target)
    start = time.perf_counter()
    train(cfg, source=source, progress=False)
    seconds = time.perf_counter() - start
    print(f"interplab: trained in {seconds:.1f} s", flush=True)
    return load_interplab(out), batches * args.batch_size, seconds, source.model


def load_interplab(out: str):
    """The trained transcoder as a function x_in -> ŷ (its folder is the run's only subfolder with a cfg.json)."""
    folder = next(p.parent for p in sorted(Path(out).glob("*/cfg.json")))
    return load_transcoder(str(folder)).eval()


def train_sparsify(args: argparse.Namespace, base, contexts: torch.Tensor, bos: int, out: str):
    """sparsify's Python Trainer on `contexts`: (predictor, tokens trained, seconds)."""
    from datasets import Dataset
    from sparsify import SaeConfig, Trainer, TrainConfig as SparsifyConfig

    dataset = Dataset.from_dict({"input_ids": contexts.tolist()}).with_format("torch")
    cfg = SparsifyConfig(SaeConfig(transcode=True, k=K, num_latents=D_SAE), batch_size=args.batch_size // CTX,
                         hookpoints=[f"layers.{LAYER}.mlp"], exclude_tokens=[bos], log_to_wandb=False,
                         save_dir=out, init_seeds=[0])
    precision = torch.get_float32_matmul_precision()  # fit() sets "high"; give it back for what follows
    with truncated(base, LAYER + 1):
        start = time.perf_counter()
        trainer = Trainer(cfg, dataset, base)
        trainer.fit()
        seconds = time.perf_counter() - start
    torch.set_float32_matmul_precision(precision)
    sae = trainer.saes[f"layers.{LAYER}.mlp"].eval()  # fit() ends by saving, which swaps in the averaged weights
    return (lambda x: sae(x).sae_out), int((contexts != bos).sum()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000, help="training tokens (BOS excluded)")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step (sparsify: / 128 contexts)")
    parser.add_argument("--test-contexts", type=int, default=64, help="held-out contexts of 128 tokens")
    parser.add_argument("--lr", type=float, default=None, help="interplab's Adam learning rate (default: its own)")
    parser.add_argument("--transcoder-init", default="tied", choices=("tied", "fitted"),
                        help="interplab's encoder start (see interplab.sae.transcoder_init)")
    parser.add_argument("--no-interplab", action="store_true", help="run the sparsify side only")
    args = parser.parse_args()
    torch.manual_seed(0)
    n_contexts = math.ceil(args.tokens / (CTX - 1))

    with tempfile.TemporaryDirectory() as tmp:
        ours = None
        if not args.no_interplab:
            ours, ours_tokens, ours_s, model = train_interplab(args, n_contexts, f"{tmp}/interplab")
            print(f"interplab: {ours_tokens:,} tokens in {ours_s:.1f} s", flush=True)
        else:
            from interplab.models import load_model
            model = load_model(MODEL, device="cpu")
        base, tokenizer = model.model.model, model.tokenizer
        train_ctx = torch.stack(list(itertools.islice(iter_contexts("python-docs", tokenizer, CTX), n_contexts)))
        theirs, theirs_tokens, theirs_s = train_sparsify(args, base, train_ctx, tokenizer.bos_token_id,
                                                         f"{tmp}/sparsify")
        print(f"sparsify: {theirs_tokens:,} tokens in {theirs_s:.1f} s", flush=True)

    test_ctx = torch.stack(list(itertools.islice(iter_contexts("python-docs", tokenizer, CTX, split="test"),
                                                 args.test_contexts)))
    x, y = mlp_pairs(base, test_ctx)
    cache = model.run_with_cache(test_ctx, [HOOK_IN, HOOK_OUT]).cache  # interplab's hooks must read the same pairs
    hook_gap = max((cache[HOOK_IN][:, 1:].flatten(0, 1) - x).abs().max().item(),
                   (cache[HOOK_OUT][:, 1:].flatten(0, 1) - y).abs().max().item())
    print(f"held out: {len(x):,} tokens; interplab hooks vs HF module: max |diff| {hook_gap:.2e}", flush=True)
    ours_fvu = None if ours is None else fvu(ours, x, y)
    theirs_fvu = fvu(theirs, x, y)
    print(f"FVU: interplab {ours_fvu}, sparsify {theirs_fvu:.4f}", flush=True)

    ours_tok_s = None if ours is None else ours_tokens / ours_s
    theirs_tok_s = theirs_tokens / theirs_s
    print(json.dumps({
        "bench": "transcoder_train",
        "interplab_tok_s": None if ours_tok_s is None else round(ours_tok_s, 1),
        "sparsify_tok_s": round(theirs_tok_s, 1),
        "speedup_vs_sparsify": None if ours_tok_s is None else round(ours_tok_s / theirs_tok_s, 3),
        "interplab_fvu": None if ours_fvu is None else round(ours_fvu, 5),
        "sparsify_fvu": round(theirs_fvu, 5),
        "interplab_tokens": None if ours is None else ours_tokens, "sparsify_tokens": theirs_tokens,
        "test_tokens": len(x), "hook": f"{HOOK_IN} -> {HOOK_OUT}", "k": K, "d_sae": D_SAE,
        "batch_tokens": args.batch_size, "torch_threads": torch.get_num_threads(),
        "transcoder_init": args.transcoder_init, "lr": args.lr,
    }))


if __name__ == "__main__":
    main()
