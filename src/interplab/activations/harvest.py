"""Harvest: run a model over a corpus and write the activations at several hook points into a store.

All requested hooks are read in one forward pass, which stops right after the last of them. The token stream is
deterministic (corpus, split, seed), and shards hold whole batches, so a harvest killed at any moment can resume
from its last durable shard and end byte-identical to one that was never interrupted.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Iterator, NamedTuple

import torch
from tqdm.auto import tqdm

from interplab.activations.writer import StoreWriter
from interplab.config import DTYPES
from interplab.errors import InterplabError
from interplab.models import HookedModel, load_model


@dataclass
class HarvestConfig:
    """What to harvest, from which model and text, and where to."""

    model: str = "smollm2-135m"
    """Model spec: 'smollm2-135m', a .gguf file, a local HF or toy-model folder, or an HF hub id."""
    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"])
    """Hook points to harvest, comma-separated (TransformerLens names, e.g. blocks.6.hook_resid_post)."""
    corpus: str = "python-docs"
    """Text corpus: 'python-docs', a .txt/.jsonl/.parquet file or folder, a saved HF dataset, or hf:NAME."""
    tokens: int = 1_000_000
    """Number of tokens to harvest (rounded up to whole contexts)."""
    ctx_len: int = 128
    """Tokens per context (BOS included); at most the model's context length."""
    batch_size: int = 16
    """Contexts per forward pass."""
    out: str = "activations"
    """Output store: a folder or fsspec URL (s3://... needs interplab[s3])."""
    dtype: str = "float32"
    """Dtype of the stored activations: float32, float16 or bfloat16."""
    model_dtype: str = "float32"
    """Dtype the model runs in: float32, float16 or bfloat16."""
    split: str = "train"
    """Corpus split: train, test (held out) or all."""
    test_fraction: float = 0.05
    """Share of documents held out as the test split (decided by a hash of each text; same value to harvest, train
    and evaluate, so the splits stay disjoint)."""
    seed: int = 0
    """Seed of the document shuffle."""
    contexts_per_shard: int = 256
    """Contexts per shard file (rounded to a multiple of batch_size)."""
    device: str | None = None
    """Device to run on (default: cuda if available, else cpu)."""
    resume: bool = False
    """Continue an interrupted harvest in --out from its last complete shard."""

    @property
    def n_contexts(self) -> int:
        return math.ceil(self.tokens / self.ctx_len)

    def validate(self) -> None:
        """Check what can be checked before loading anything."""
        if self.tokens < 1:
            raise InterplabError(f"--tokens must be a positive number of tokens, got {self.tokens}")
        if self.ctx_len < 2:
            raise InterplabError(f"--ctx-len must be at least 2 (BOS plus one token), got {self.ctx_len}")
        if self.batch_size < 1 or self.contexts_per_shard < 1:
            raise InterplabError("--batch-size and --contexts-per-shard must be at least 1")
        if not self.hooks:
            raise InterplabError("--hooks needs at least one hook name, e.g. blocks.6.hook_resid_post")
        if self.dtype not in DTYPES:
            raise InterplabError(f"--dtype '{self.dtype}' is not one of {sorted(DTYPES)}")

    def store_identity(self) -> dict:
        """The settings that define a store's contents: resuming requires them to match."""
        skip = {"out", "resume", "device", "batch_size"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


class HarvestResult(NamedTuple):
    """Summary of a finished harvest."""

    out: str
    n_contexts: int
    n_tokens: int
    seconds: float
    tokens_per_s: float
    """Tokens harvested in this run (not counting resumed ones) per second, writes included."""
    already_complete: bool
    """The store was complete before this run: nothing was done."""


def harvest(cfg: HarvestConfig, model: HookedModel | None = None, *, progress: bool = True) -> HarvestResult:
    """Run the harvest described by `cfg` (loading the model unless one is given)."""
    import time

    from interplab.data import iter_contexts

    cfg.validate()
    model = model or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    _check_model_fits(cfg, model)
    shard = max(cfg.batch_size, cfg.contexts_per_shard // cfg.batch_size * cfg.batch_size)
    contexts = iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split=cfg.split, seed=cfg.seed,
                             test_fraction=cfg.test_fraction)
    first = next(contexts, None)  # reads the corpus now, so a bad corpus fails before anything is written
    if first is None:
        raise InterplabError(f"corpus '{cfg.corpus}' ({cfg.split} split) yields no context of {cfg.ctx_len} tokens")
    contexts = itertools.chain([first], contexts)

    shapes = {hook: (cfg.ctx_len, model.hook_dim(hook)) for hook in cfg.hooks}
    writer = StoreWriter(cfg.out, config=cfg.store_identity(), hooks=list(cfg.hooks), shapes=shapes,
                         dtype=cfg.dtype, contexts_per_shard=shard, resume=cfg.resume)
    start = time.perf_counter()
    with writer:
        if writer.complete:
            return HarvestResult(cfg.out, writer.n_contexts, writer.n_contexts * cfg.ctx_len, 0.0, 0.0, True)
        done = writer.n_contexts
        bar = tqdm(total=cfg.n_contexts * cfg.ctx_len, initial=done * cfg.ctx_len, unit="tok", unit_scale=True,
                   desc=f"harvest {','.join(cfg.hooks)}", disable=not progress, smoothing=0.1)
        with bar, torch.inference_mode():
            for tokens in _batches(itertools.islice(contexts, done, cfg.n_contexts), cfg.batch_size):
                cache = model.run_with_cache(tokens, cfg.hooks).cache
                writer.add({h: cache[h].to("cpu", DTYPES[cfg.dtype]) for h in cfg.hooks}, tokens)
                bar.update(tokens.numel())
        writer.finish()
    seconds = time.perf_counter() - start
    harvested = (writer.n_contexts - done) * cfg.ctx_len
    if writer.n_contexts < cfg.n_contexts:
        tqdm.write(f"note: the corpus ran out after {writer.n_contexts} of {cfg.n_contexts} contexts")
    return HarvestResult(cfg.out, writer.n_contexts, writer.n_contexts * cfg.ctx_len, seconds,
                         harvested / seconds if seconds else 0.0, False)


def _check_model_fits(cfg: HarvestConfig, model: HookedModel) -> None:
    model.check_hook_names(cfg.hooks)
    per_token = [h for h in cfg.hooks if model.hook_dim(h) is None]
    if per_token:
        raise InterplabError(f"cannot harvest {per_token}: a store holds one vector per token, and attention "
                             "patterns are [batch, head, q, k]; read them with run_with_cache instead")
    if len(set(cfg.hooks)) != len(cfg.hooks):
        raise InterplabError(f"--hooks lists a hook twice: {cfg.hooks}")
    if cfg.ctx_len > model.info.n_ctx:
        raise InterplabError(f"--ctx-len {cfg.ctx_len} is longer than {model.info.spec} allows ({model.info.n_ctx})")
    if model.tokenizer is None:
        raise InterplabError(f"{model.info.spec} has no tokenizer, so it cannot read a text corpus")


def _batches(contexts: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    while batch := list(itertools.islice(contexts, batch_size)):
        yield torch.stack(batch)
