"""The induction toy: a 2-layer attention-only toy transformer trained to predict repeated random tokens, the known
answer the head detectors and head patching are checked against.

Each training sequence is BOS, a random prefix, then a random R repeated to the end of the context:

    [BOS, x_1 … x_m, r_1 … r_L, r_1 … r_L, r_1 …]     BOS = 0, x_j and r_i uniform over 1 … d_vocab − 1

with L uniform in min_len … max_len and m uniform in 0 … max_prefix, per sequence. The loss counts the predictions
of every repeat except the second copy's first token (r_1 follows r_L, which says nothing about it). Why not just
[BOS, R, R]: with L and m varying, no fixed positional offset solves the task, so the model must find the earlier
occurrence of the current token and copy the token after it; and repeating R to the end makes every position a key
some later query needs, so the layer-0 head learns to attend to the previous token at every position (with only two
copies it did so only where first copies lie, and detectors read the second copy). What is learned is the textbook
circuit (Olsson et al. 2022): previous-token heads in layer 0, induction heads in layer 1. [BOS, R, R] is the first
2L + 1 tokens of such a sequence with m = 0.

Trained with AdamW, on the CPU in ~10 s (300–500 steps; `model.extra_config["steps"]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Bool, Int
from tqdm.auto import tqdm

from interplab.errors import InterplabError, check_int
from interplab.models.toy import ToyConfig, ToyTransformer

BOS = 0


@dataclass
class InductionToyConfig:
    """Shape and training of the induction toy."""

    d_vocab: int = 64
    """Token ids: 0 = BOS, 1 … d_vocab − 1 drawn uniformly."""
    min_len: int = 4
    """Shortest repeated half."""
    max_len: int = 12
    """Longest repeated half."""
    max_prefix: int = 12
    """Longest run of random tokens between BOS and the first copy (the context is 1 + max_prefix + 2·max_len)."""
    d_model: int = 64
    n_heads: int = 4
    d_head: int = 16
    layer_norm: bool = False
    """LayerNorm before attention and unembedding. Off: with it on, training tends to find an equivalent circuit
    in which two layer-0 heads at offsets a and a − 1 (a > 1) store each bigram, instead of self + previous token."""
    steps: int = 1500
    """AdamW steps at most (training stops early once `target_accuracy` is reached)."""
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.01
    target_accuracy: float = 0.95
    """Stop once the repeats of a fresh batch (checked every 50 steps) are predicted this well (> 1: never stop).
    The ceiling is below 1: a token that occurs twice in R has two candidate successors."""
    seed: int = 0
    """Seed of the initialisation and of the training sequences."""

    def validate(self) -> None:
        check_int("d_vocab", self.d_vocab, 3)
        check_int("min_len", self.min_len, 2)
        check_int("max_prefix", self.max_prefix, 0)
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        if self.max_len < self.min_len:
            raise InterplabError(f"max_len {self.max_len} must be >= min_len {self.min_len}")

    @property
    def n_ctx(self) -> int:
        return 1 + self.max_prefix + 2 * self.max_len

    def model_config(self) -> ToyConfig:
        return ToyConfig(n_layers=2, d_model=self.d_model, n_heads=self.n_heads, d_head=self.d_head, d_mlp=None,
                         n_ctx=self.n_ctx, d_vocab=self.d_vocab, layer_norm=self.layer_norm,
                         seed=self.seed)


class RepeatBatch(NamedTuple):
    tokens: Int[torch.Tensor, "batch pos"]
    mask: Bool[torch.Tensor, "batch pos"]
    """True at positions whose next token is a predictable repeat (r_2 … r_L of the second copy)."""


def sample_repeats(cfg: InductionToyConfig, n: int, gen: torch.Generator, length: int | None = None,
                   start: int | None = None) -> RepeatBatch:
    """n sequences [BOS, prefix, R, R, R …] of `cfg.n_ctx` tokens (R repeated to the end): L per sequence uniform in
    min_len … max_len (or `length`), the prefix length uniform in 0 … max_prefix (or `start` − 1)."""
    n_pos = cfg.n_ctx
    tokens = torch.randint(1, cfg.d_vocab, (n, n_pos), generator=gen)
    tokens[:, 0] = BOS
    lengths = (torch.full((n,), length) if length is not None else
               torch.randint(cfg.min_len, cfg.max_len + 1, (n,), generator=gen))[:, None]
    starts = (torch.full((n,), start) if start is not None else
              torch.randint(1, cfg.max_prefix + 2, (n,), generator=gen))[:, None]
    pos = torch.arange(n_pos)[None]
    copies = pos >= starts + lengths  # every position after the first copy repeats the one L before it
    source = torch.where(copies, starts + (pos - starts) % lengths, pos)
    tokens = tokens.gather(1, source)
    # Position p predicts p + 1: count p when p + 1 is a repeat, except the second copy's first token (it follows
    # r_L, which says nothing about r_1).
    mask = (pos >= starts + lengths) & (pos < n_pos - 1)
    return RepeatBatch(tokens, mask)


def repeat_loss_accuracy(model: ToyTransformer, batch: RepeatBatch) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the masked next-token predictions, and the fraction of them whose argmax is right."""
    logits = model(batch.tokens)[:, :-1]
    targets, mask = batch.tokens[:, 1:], batch.mask[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    accuracy = float((logits[mask].argmax(-1) == targets[mask]).float().mean())
    return loss, accuracy


@torch.no_grad()
def repeat_accuracy(model: ToyTransformer, cfg: InductionToyConfig, n: int, seed: int, length: int | None = None,
                    start: int | None = None) -> float:
    """Accuracy on the repeats of n fresh sequences (see `sample_repeats` for `length` and `start`)."""
    batch = sample_repeats(cfg, n, torch.Generator().manual_seed(seed), length, start)
    return repeat_loss_accuracy(model, batch)[1]


def train_induction_toy(cfg: InductionToyConfig, progress: bool = False) -> ToyTransformer:
    """Train the toy until a fresh batch's repeats are predicted with `target_accuracy` or `steps` run out; the
    number of steps taken is in `model.extra_config["steps"]`."""
    cfg.validate()
    model = ToyTransformer(cfg.model_config(), spec="induction-toy")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.steps), disable=not progress, desc="induction toy")
    step = 0
    for step in bar:
        loss, _ = repeat_loss_accuracy(model, sample_repeats(cfg, cfg.batch_size, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            accuracy = repeat_accuracy(model, cfg, 256, cfg.seed + 10_000 + step)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{accuracy:.3f}")
            if accuracy >= cfg.target_accuracy:
                break
    model.extra_config = {"task": "induction", "steps": step + 1}
    return model.eval()
