"""What a cross-layer transcoder trains on: token batches of a corpus, and the model's MLP inputs and outputs there.

`ContextBatches.batches(start)` yields, from step `start` on, the same [batch_size, ctx_len] token batches an
uninterrupted run sees: pass p reads the corpus's documents shuffled with seed + p (`iter_contexts`), and resuming
skips the contexts of earlier steps by tokenising them, without running the model. `mlp_rows` runs the model once
on a batch, stopping after the last block whose hooks are read, and returns every layer's input and output rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.sae.crosslayer_config import CLTTrainConfig


class MLPRows(NamedTuple):
    """Every layer's MLP input and output at the trained positions of a batch, as rows."""

    xs: list[Float[Tensor, "rows d_model"]]
    """Layer l's MLP input (what its encoder reads)."""
    ys: list[Float[Tensor, "rows d_model"]]
    """Layer l's MLP output (what the decoders into layer l predict)."""


class ContextBatches:
    """Seeded, resumable token batches of `cfg.corpus` (or of the given `token_batches`, in order)."""

    def __init__(self, model: HookedModel, cfg: CLTTrainConfig,
                 token_batches: Sequence[Int[Tensor, "batch pos"]] | None = None) -> None:
        self.cfg, self.model, self.token_batches = cfg, model, token_batches
        if token_batches is not None:
            if len(token_batches) < cfg.n_steps:
                raise InterplabError(f"{len(token_batches)} token batches given for {cfg.n_steps} steps "
                                     f"(--tokens {cfg.tokens}); give more batches or fewer tokens")
            for tokens in token_batches[:1]:
                if tuple(tokens.shape) != (cfg.batch_size, cfg.ctx_len):
                    raise InterplabError(f"token batches must be [{cfg.batch_size}, {cfg.ctx_len}] "
                                         f"(--batch-size, --ctx-len), got {list(tokens.shape)}")
            return
        if model.tokenizer is None:
            raise InterplabError(f"{model.info.spec} has no tokenizer, so it cannot read a text corpus")
        if cfg.ctx_len > model.info.n_ctx:
            raise InterplabError(f"--ctx-len {cfg.ctx_len} is longer than {model.info.spec} allows "
                                 f"({model.info.n_ctx})")
        if next(self._pass(0), None) is None:  # read the corpus now: a bad one fails before anything is written
            raise InterplabError(f"corpus '{cfg.corpus}' ({cfg.split} split) yields no context of {cfg.ctx_len} "
                                 "tokens")

    def _pass(self, n_pass: int) -> Iterator[Int[Tensor, " ctx_len"]]:
        cfg = self.cfg
        return iter_contexts(cfg.corpus, self.model.tokenizer, cfg.ctx_len, split=cfg.split, seed=cfg.seed + n_pass,
                             test_fraction=cfg.test_fraction)

    def batches(self, start: int = 0) -> Iterator[Int[Tensor, "batch pos"]]:
        """Token batches from step `start` on, endlessly (the corpus repeats, reshuffled, when it ends)."""
        if self.token_batches is not None:
            yield from self.token_batches[start:]
            return
        contexts = itertools.chain.from_iterable(self._pass(p) for p in itertools.count())
        contexts = itertools.islice(contexts, start * self.cfg.batch_size, None)
        while True:
            yield torch.stack(list(itertools.islice(contexts, self.cfg.batch_size)))


def mlp_rows(model: HookedModel, tokens: Int[Tensor, "batch pos"], cfg: CLTTrainConfig) -> MLPRows:
    """One forward pass (stopped after the last layer's output hook) reading every layer's `cfg.in_hook` and
    `cfg.out_hook`; BOS left out with `cfg.drop_bos`; float32 rows [batch · positions, d_model]."""
    L = model.info.n_layers
    ins = [cfg.in_hook.format(layer=layer) for layer in range(L)]
    outs = [cfg.out_hook.format(layer=layer) for layer in range(L)]
    cache = model.run_with_cache(tokens, ins + outs).cache
    start = int(cfg.drop_bos)

    def rows(name: str) -> Tensor:
        return cache[name][:, start:].flatten(0, 1).float()

    return MLPRows([rows(name) for name in ins], [rows(name) for name in outs])


def check_hooks(model: HookedModel, cfg: CLTTrainConfig) -> None:
    """Every layer's in/out hook exists on `model` and carries one d_model vector per token."""
    L = model.info.n_layers
    names = [t.format(layer=layer) for t in (cfg.in_hook, cfg.out_hook) for layer in range(L)]
    model.check_hook_names(names)  # its message lists the valid names
    for name in names:
        if model.hook_dim(name) != model.info.d_model:
            raise InterplabError(f"hook {name} carries width {model.hook_dim(name)}, not d_model="
                                 f"{model.info.d_model}: a CLT reads and writes the residual width (an MLP's input "
                                 "and output)")
