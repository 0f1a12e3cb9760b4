"""Where training batches come from: a harvested store, or a model run on a corpus (stream mode).

Any object with the attributes of `BatchSource` can feed the trainer (`train(cfg, source=...)`); the planted-truth
lab's `interplab.synth.sources.synthetic_source` builds the one of synthetic mode (--synthetic).

Both sources are deterministic functions of the seed and resumable by batch index: `batches(start)` yields the
same batches an uninterrupted run would have seen from batch `start` on, without re-training on (store) or
re-running the model over (stream) what came before. Both repeat the data (a new shuffle per pass) when a run
asks for more tokens than one pass holds.

- `StoreSource`: pass e reads `ActivationStore.iter_batches(seed=seed + e, drop_last=True)`, so a pass holds
  n_tokens // batch_size batches; each shard is checked for NaN/inf as it is loaded.
- `StreamSource`: contexts from `iter_contexts` (pass e shuffles documents with seed + e) are taken a shuffle
  buffer at a time; each fill is run through the model, its rows shuffled (a generator seeded by the seed and the
  fill's index) and cut into whole batches (the few rows beyond the last whole batch of a fill are dropped).
  Resuming skips the contexts of earlier fills by tokenising them, without running the model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.activations.inputs import manifest_digest
from interplab.activations.store import ActivationStore
from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.models.load import load_model
from interplab.sae.train_config import TrainConfig

_FILL_SEED_STRIDE = 1_000_003  # seed of fill i: seed * stride + i, so that fills of nearby seeds differ


class BatchSource(Protocol):
    """What the trainer reads batches from. A source may also have `tokens_per_pass` (the tokens of whole batches
    in one pass over finite data), which sets the default length of a run without --tokens."""

    d_in: int
    """Width of the activations."""
    hook: str
    """The hook point the activations come from; saved in each SAE's config as its hook_name."""
    model_spec: str
    """The model the activations come from; saved in each SAE's config as its model."""
    describe: str
    """A few words naming the data, for messages."""

    def batches(self, start: int = 0) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Float32 batches [batch_size, d_in] from batch index `start` on, endlessly, the same on every call."""
        ...


def open_source(cfg: TrainConfig) -> BatchSource:
    """The batch source of store or stream mode (--store, --model). Synthetic mode (--synthetic) belongs to the
    planted-truth lab, above this package: `interplab.synth.sources.synthetic_source(cfg)` builds its source."""
    if cfg.synthetic is not None:
        raise InterplabError(f"--synthetic {cfg.synthetic}: the SAE trainer does not build generators; build the "
                             "source with interplab.synth.sources.synthetic_source(cfg) and pass it: "
                             "train(cfg, source=...)")
    if cfg.store is not None:
        return StoreSource(cfg.store, cfg.hook, cfg.batch_size, cfg.seed, skip_positions=int(cfg.exclude_bos))
    if cfg.model is None or cfg.hook is None:
        raise InterplabError("stream mode needs --model and --hook")  # validate() says so first; for other callers
    return StreamSource(cfg.model, cfg.hook, cfg.corpus, split=cfg.split, ctx_len=cfg.ctx_len,
                        model_batch_size=cfg.model_batch_size, shuffle_buffer=cfg.shuffle_buffer,
                        batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                        test_fraction=cfg.test_fraction, skip_positions=int(cfg.exclude_bos))


def run_identity(cfg: TrainConfig) -> dict[str, object]:
    """What defines the run `cfg` describes, written to its train_config.json: its settings, and what it reads.

    From a store: the digest of its manifest (with its shard count and tokens, to make a refusal readable), so that
    resuming after the store grew or was harvested again is refused. A store whose harvest is unfinished is refused unless `cfg.allow_incomplete_store`.
    """
    identity = cfg.identity()
    if cfg.store is not None:
        store = ActivationStore(cfg.store)  # a missing store, a file, a broken manifest: one line each
        if not store.complete and not cfg.allow_incomplete_store:
            raise InterplabError(f"{cfg.store} is an unfinished harvest ({store.n_tokens:,} tokens in "
                                 f"{len(store.shards)} shards, manifest complete=false): finish it with interplab "
                                 "harvest ... --resume, or pass --allow-incomplete-store to train on what is there")
        identity["store_data"] = {"manifest_sha256": manifest_digest(store.manifest), "shards": len(store.shards),
                                  "tokens": store.n_tokens, "complete": store.complete,
                                  "d": {hook: store.d(hook) for hook in store.hooks}}
    return identity


class StoreSource:
    """Batches of one hook of an activation store."""

    def __init__(self, url: str, hook: str | None, batch_size: int, seed: int, skip_positions: int = 0) -> None:
        self.store = ActivationStore(url)
        if hook is None:
            if len(self.store.hooks) > 1:
                raise InterplabError(f"{url} holds several hooks; pick one with --hook: {', '.join(self.store.hooks)}")
            hook = self.store.hooks[0]
        self.d_in = self.store.d(hook)  # also rejects an unknown hook, listing the store's hooks
        self.hook = hook
        self.model_spec = str(self.store.manifest["config"].get("model", ""))
        self.batch_size, self.seed, self.skip_positions = batch_size, seed, skip_positions
        n_rows = self.store.n_contexts * (self.store.ctx_len - skip_positions)
        self.batches_per_pass = n_rows // batch_size
        if self.batches_per_pass < 1:
            skipped = " once position 0 of each context (BOS) is left out" if skip_positions else ""
            raise InterplabError(f"{url} holds {n_rows} tokens{skipped}, fewer than one batch "
                                 f"(--batch-size {batch_size})")
        self.tokens_per_pass = self.batches_per_pass * batch_size
        self.describe = f"{url} at {hook}"

    def batches(self, start: int = 0) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Float32 batches [batch_size, d_in] from batch index `start` on, endlessly (pass after pass)."""
        for n_pass in itertools.count(start // self.batches_per_pass):
            it = self.store.iter_batches(self.hook, self.batch_size, seed=self.seed + n_pass, drop_last=True,
                                         dtype=torch.float32, check_finite=True, skip_positions=self.skip_positions)
            if n_pass == start // self.batches_per_pass:
                it = itertools.islice(it, start % self.batches_per_pass, None)
            yield from it


class StreamSource:
    """Batches of one hook of a model run on a corpus, through a shuffle buffer."""

    def __init__(self, model_spec: str, hook: str, corpus: str, *, split: str, ctx_len: int, model_batch_size: int,
                 shuffle_buffer: int, batch_size: int, seed: int, device: str | None,
                 test_fraction: float = 0.05, skip_positions: int = 0) -> None:
        self.model = load_model(model_spec, device=device)
        d_in = self.model.hook_dim(hook)  # rejects an unknown hook, listing the valid ones
        if d_in is None:
            raise InterplabError(f"cannot train on {hook}: attention patterns are [batch, head, q, k], "
                                 "not one vector per token")
        if ctx_len > self.model.info.n_ctx:
            raise InterplabError(f"--ctx-len {ctx_len} is longer than {model_spec} allows ({self.model.info.n_ctx})")
        if self.model.tokenizer is None:
            raise InterplabError(f"{model_spec} has no tokenizer, so it cannot read a text corpus")
        self.d_in, self.hook, self.model_spec = d_in, hook, model_spec
        self.corpus, self.split, self.ctx_len, self.test_fraction = corpus, split, ctx_len, test_fraction
        self.model_batch_size, self.batch_size, self.seed = model_batch_size, batch_size, seed
        self.contexts_per_fill = math.ceil(shuffle_buffer / ctx_len)
        if not 0 <= skip_positions < ctx_len:
            raise InterplabError(f"cannot skip {skip_positions} positions of contexts of {ctx_len} tokens")
        self.skip_positions = skip_positions
        self.batches_per_fill = self.contexts_per_fill * (ctx_len - skip_positions) // batch_size
        self.describe = f"{model_spec} at {hook} on {corpus}"
        # Read the corpus now, so that a bad corpus fails before anything is written.
        if next(self._pass(0), None) is None:
            raise InterplabError(f"corpus '{corpus}' ({split} split) yields no context of {ctx_len} tokens")

    def _pass(self, n_pass: int) -> Iterator[Tensor]:
        return iter_contexts(self.corpus, self.model.tokenizer, self.ctx_len, split=self.split,
                                   seed=self.seed + n_pass, test_fraction=self.test_fraction)

    def _contexts(self) -> Iterator[Tensor]:
        """Contexts of pass 0, then pass 1 (documents reshuffled), and so on."""
        for n_pass in itertools.count():
            yield from self._pass(n_pass)

    def batches(self, start: int = 0) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Float32 batches [batch_size, d_in] on the model's device from batch index `start` on, endlessly."""
        fill, skip = divmod(start, self.batches_per_fill)
        contexts = itertools.islice(self._contexts(), fill * self.contexts_per_fill, None)
        for fill in itertools.count(fill):
            chunk = list(itertools.islice(contexts, self.contexts_per_fill))
            rows = self._activations(torch.stack(chunk))  # [contexts * ctx_len, d_in]
            gen = torch.Generator().manual_seed(self.seed * _FILL_SEED_STRIDE + fill)
            perm = torch.randperm(len(rows), generator=gen).to(rows.device)
            for b in range(skip, self.batches_per_fill):
                yield rows[perm[b * self.batch_size:(b + 1) * self.batch_size]]
            skip = 0

    def _activations(self, tokens: Tensor) -> Float[Tensor, "rows d_in"]:
        """The hook's activations of `tokens` [contexts, ctx_len], the skipped positions left out, as rows."""
        parts = []
        for i in range(0, len(tokens), self.model_batch_size):
            cache = self.model.run_with_cache(tokens[i:i + self.model_batch_size], [self.hook]).cache
            parts.append(cache[self.hook][:, self.skip_positions:].flatten(0, 1).float())
        return torch.cat(parts)
