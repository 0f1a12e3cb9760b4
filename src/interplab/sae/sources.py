"""Where training batches come from: a harvested store, or a model run on a corpus (stream mode).

Any object with the attributes of `BatchSource` can feed the trainer (`train(cfg, source=...)`); the planted-truth
lab's `interplab.synth.sources.synthetic_source` builds the one of synthetic mode (--synthetic).

Both sources are deterministic functions of the seed and resumable by batch index: `batches(start)` yields the
same batches an uninterrupted run would have seen from batch `start` on, without re-training on (store) or
re-running the model over (stream) what came before. Both repeat the data (a new shuffle per pass) when a run
asks for more tokens than one pass holds.

With a target hook (transcoders, `--target`), a source yields pairs (x, y) of the two hooks' activations at the
same tokens, in the same order: a store source reads the two hooks with the same shuffle (the store's row order
depends on the seed and the shard sizes only, so two readers with one seed agree, which the token ids of every batch
confirm), a stream source reads both hooks from one forward pass and permutes their rows together.

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

Batch = Tensor | tuple[Tensor, Tensor]
"""A training batch: activations x [batch, d_in], or (x, target) [batch, d_in] each for a transcoder."""


class BatchSource(Protocol):
    """What the trainer reads batches from. A source may also have `tokens_per_pass` (the tokens of whole batches
    in one pass over finite data), which sets the default length of a run without --tokens, and `target` (the hook
    a transcoder reconstructs; its batches are then pairs (x, y); absent or None: an SAE's source)."""

    d_in: int
    """Width of the activations."""
    hook: str
    """The hook point the activations come from; saved in each SAE's config as its hook_name."""
    model_spec: str
    """The model the activations come from; saved in each SAE's config as its model."""
    describe: str
    """A few words naming the data, for messages."""

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Float32 batches [batch_size, d_in] (or pairs of them, with a target) from batch index `start` on,
        endlessly, the same on every call."""
        ...


def open_source(cfg: TrainConfig) -> BatchSource:
    """The batch source of store or stream mode (--store, --model). Synthetic mode (--synthetic) belongs to the
    planted-truth lab, above this package: `interplab.synth.sources.synthetic_source(cfg)` builds its source."""
    if cfg.synthetic is not None:
        raise InterplabError(f"--synthetic {cfg.synthetic}: the SAE trainer does not build generators; build the "
                             "source with interplab.synth.sources.synthetic_source(cfg) and pass it: "
                             "train(cfg, source=...)")
    if cfg.store is not None:
        return StoreSource(cfg.store, cfg.hook, cfg.batch_size, cfg.seed, skip_positions=int(cfg.exclude_bos),
                           target=cfg.target)
    if cfg.model is None or cfg.hook is None:
        raise InterplabError("stream mode needs --model and --hook")  # validate() says so first; for other callers
    return StreamSource(cfg.model, cfg.hook, cfg.corpus, split=cfg.split, ctx_len=cfg.ctx_len,
                        model_batch_size=cfg.model_batch_size, shuffle_buffer=cfg.shuffle_buffer,
                        batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                        test_fraction=cfg.test_fraction, skip_positions=int(cfg.exclude_bos), target=cfg.target)


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
    """Batches of one hook of an activation store (or pairs of two hooks, with a target)."""

    def __init__(self, url: str, hook: str | None, batch_size: int, seed: int, skip_positions: int = 0,
                 target: str | None = None) -> None:
        self.store = ActivationStore(url)
        if hook is None:
            if len(self.store.hooks) > 1:
                raise InterplabError(f"{url} holds several hooks; pick one with --hook: {', '.join(self.store.hooks)}")
            hook = self.store.hooks[0]
        self.d_in = self.store.d(hook)  # also rejects an unknown hook, listing the store's hooks
        self.hook, self.target = hook, target
        if target is not None:
            _check_target_width(self.store.d(target), self.d_in, hook, target)
        self.model_spec = str(self.store.manifest["config"].get("model", ""))
        self.batch_size, self.seed, self.skip_positions = batch_size, seed, skip_positions
        n_rows = self.store.n_contexts * (self.store.ctx_len - skip_positions)
        self.batches_per_pass = n_rows // batch_size
        if self.batches_per_pass < 1:
            skipped = " once position 0 of each context (BOS) is left out" if skip_positions else ""
            raise InterplabError(f"{url} holds {n_rows} tokens{skipped}, fewer than one batch "
                                 f"(--batch-size {batch_size})")
        self.tokens_per_pass = self.batches_per_pass * batch_size
        self.describe = f"{url} at {hook}" + (f" -> {target}" if target else "")

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Float32 batches [batch_size, d_in] (pairs with a target) from batch index `start` on, endlessly."""
        for n_pass in itertools.count(start // self.batches_per_pass):
            it = self._pass(n_pass)
            if n_pass == start // self.batches_per_pass:
                it = itertools.islice(it, start % self.batches_per_pass, None)
            yield from it

    def _pass(self, n_pass: int) -> Iterator[Batch]:
        """The batches of pass `n_pass`: one shuffle of the store (seed + n_pass), read once per hook."""
        def read(hook: str, with_tokens: bool) -> Iterator:
            return self.store.iter_batches(hook, self.batch_size, seed=self.seed + n_pass, drop_last=True,
                                           dtype=torch.float32, check_finite=True, with_tokens=with_tokens,
                                           skip_positions=self.skip_positions)
        if self.target is None:
            return read(self.hook, False)
        return (_paired(x, y, self.describe) for x, y in zip(read(self.hook, True), read(self.target, True)))


def _paired(x: tuple[Tensor, Tensor], y: tuple[Tensor, Tensor], describe: str) -> tuple[Tensor, Tensor]:
    """(x, y) activations of two readers of one store, after checking that they are at the same tokens."""
    if not torch.equal(x[1], y[1]):
        raise InterplabError(f"{describe}: the two hooks' batches are not at the same tokens; the store's shards "
                             "differ between hooks (harvest them again in one pass)")
    return x[0], y[0]


def _check_target_width(d_target: int | None, d_in: int, hook: str, target: str) -> None:
    """A transcoder's target must be a per-token hook as wide as its input (an MLP reads and writes d_model)."""
    if d_target is None:
        raise InterplabError(f"cannot train towards --target {target}: attention patterns are [batch, head, q, k], "
                             "not one vector per token")
    if d_target != d_in:
        raise InterplabError(f"--target {target} has width {d_target}, --hook {hook} has {d_in}: a transcoder "
                             "here reads and writes vectors of one width (e.g. an MLP's input and output)")


class StreamSource:
    """Batches of one hook of a model run on a corpus, through a shuffle buffer."""

    def __init__(self, model_spec: str, hook: str, corpus: str, *, split: str, ctx_len: int, model_batch_size: int,
                 shuffle_buffer: int, batch_size: int, seed: int, device: str | None,
                 test_fraction: float = 0.05, skip_positions: int = 0, target: str | None = None) -> None:
        self.model = load_model(model_spec, device=device)
        d_in = self.model.hook_dim(hook)  # rejects an unknown hook, listing the valid ones
        if d_in is None:
            raise InterplabError(f"cannot train on {hook}: attention patterns are [batch, head, q, k], "
                                 "not one vector per token")
        if ctx_len > self.model.info.n_ctx:
            raise InterplabError(f"--ctx-len {ctx_len} is longer than {model_spec} allows ({self.model.info.n_ctx})")
        if self.model.tokenizer is None:
            raise InterplabError(f"{model_spec} has no tokenizer, so it cannot read a text corpus")
        if target is not None:
            self.model.check_hook_names([target])  # its message lists the valid names
            _check_target_width(self.model.hook_dim(target), d_in, hook, target)
        self.d_in, self.hook, self.target, self.model_spec = d_in, hook, target, model_spec
        self.corpus, self.split, self.ctx_len, self.test_fraction = corpus, split, ctx_len, test_fraction
        self.model_batch_size, self.batch_size, self.seed = model_batch_size, batch_size, seed
        self.contexts_per_fill = math.ceil(shuffle_buffer / ctx_len)
        if not 0 <= skip_positions < ctx_len:
            raise InterplabError(f"cannot skip {skip_positions} positions of contexts of {ctx_len} tokens")
        self.skip_positions = skip_positions
        self.batches_per_fill = self.contexts_per_fill * (ctx_len - skip_positions) // batch_size
        self.describe = f"{model_spec} at {hook}" + (f" -> {target}" if target else "") + f" on {corpus}"
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

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Float32 batches [batch_size, d_in] (pairs with a target) on the model's device from batch index `start`
        on, endlessly."""
        fill, skip = divmod(start, self.batches_per_fill)
        contexts = itertools.islice(self._contexts(), fill * self.contexts_per_fill, None)
        for fill in itertools.count(fill):
            chunk = list(itertools.islice(contexts, self.contexts_per_fill))
            rows = self._activations(torch.stack(chunk))  # per hook [contexts * ctx_len, d_in]
            gen = torch.Generator().manual_seed(self.seed * _FILL_SEED_STRIDE + fill)
            perm = torch.randperm(len(rows[0]), generator=gen).to(rows[0].device)
            for b in range(skip, self.batches_per_fill):
                picked = perm[b * self.batch_size:(b + 1) * self.batch_size]
                yield rows[0][picked] if self.target is None else (rows[0][picked], rows[1][picked])
            skip = 0

    def _activations(self, tokens: Tensor) -> list[Float[Tensor, "rows d_in"]]:
        """The activations of `tokens` [contexts, ctx_len] at the hook (and the target), skipped positions left
        out, as rows: one forward pass per model batch reads both hooks."""
        hooks = [self.hook] if self.target is None else [self.hook, self.target]
        parts: list[list[Tensor]] = [[] for _ in hooks]
        for i in range(0, len(tokens), self.model_batch_size):
            cache = self.model.run_with_cache(tokens[i:i + self.model_batch_size], hooks).cache
            for part, hook in zip(parts, hooks):
                part.append(cache[hook][:, self.skip_positions:].flatten(0, 1).float())
        return [torch.cat(part) for part in parts]
