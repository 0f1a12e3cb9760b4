"""Harvest: run a model over a corpus and write the activations at several hook points into a store.

All requested hooks are read in one forward pass, which stops right after the last of them. The token stream is
deterministic (corpus, split, seed), and shards hold whole batches, so a harvest killed at any moment can resume
from its last durable shard and end byte-identical to one that was never interrupted.

Under torchrun (`torchrun --nproc_per_node N -m interplab harvest ...`) the shards are dealt round robin to the
ranks, each writing its own store, which rank 0 then merges into one (see `interplab.activations.ranked`): the
result reads back exactly like a single process's store with the same settings.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from interplab import distributed as D
from interplab.activations import ranked
from interplab.activations.configs import HarvestConfig
from interplab.activations.inputs import model_identity
from interplab.activations.store import read_manifest
from interplab.activations.writer import StoreWriter, refuse_foreign_folder
from interplab.data.corpus import iter_contexts
from interplab.dtypes import DTYPES
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.runs import check_output_folder


class HarvestResult(NamedTuple):
    """Summary of a finished harvest."""

    out: str
    n_contexts: int
    n_tokens: int
    seconds: float
    """Wall time from opening the store to the end (under torchrun: this rank's, to the end of rank 0's merge,
    which every rank leaves together)."""
    tokens_per_s: float
    """Tokens harvested in this run (not counting resumed ones; under torchrun by all ranks together) per second
    of wall time, writes (and the merge) included."""
    already_complete: bool
    """The store was complete before this run: nothing was done."""
    n_tokens_added: int = 0
    """Tokens this run harvested (n_tokens less those a resumed store already held)."""


def harvest(cfg: HarvestConfig, model: HookedModel | None = None, *, progress: bool = True) -> HarvestResult:
    """Run the harvest described by `cfg` (loading the model unless one is given).

    Under torchrun every rank calls this: it joins the process group, loads the model on its own device and
    harvests its shards (global shard s goes to rank s % N) into OUT/rank-0000r/; rank 0 then merges them. Every
    rank walks the whole deterministic token stream and keeps its own contexts, so tokenising is done N times:
    the price of shards identical to a single process's without any coordination. Each rank resumes its own
    store, so `--resume` must be given with the same number of processes.
    """
    cfg.validate()
    check_output_folder(cfg.out, "--out")  # before the model is loaded: a read-only or file --out fails at once
    if read_manifest(cfg.out) is None:
        refuse_foreign_folder(cfg.out)  # likewise someone else's folder (torchrun's rank folders are not files)
    r = D.ranks()
    if r.distributed:
        if cfg.device_map is not None:
            raise InterplabError(f"--device-map {cfg.device_map} cannot be used under torchrun (world size "
                                 f"{r.world_size}): each rank would try to take every device; use one or the other")
        D.init(D.rank_device(cfg.device))
    else:
        ranked.refuse_ranked_in_progress(cfg.out)
    device = D.rank_device(cfg.device) if r.distributed else cfg.device
    model = model or load_model(cfg.model, device=device, dtype=cfg.model_dtype, device_map=cfg.device_map)
    _check_model_fits(cfg, model)
    contexts = _contexts(cfg, model)
    shapes = {hook: (cfg.ctx_len, model.hook_dim(hook)) for hook in cfg.hooks}
    if r.distributed:
        return _harvest_ranked(cfg, model, contexts, shapes, r, progress)

    writer = StoreWriter(cfg.out, config=store_identity(cfg), hooks=list(cfg.hooks), shapes=shapes,
                         dtype=cfg.dtype, contexts_per_shard=cfg.shard_contexts, resume=cfg.resume)
    start = time.perf_counter()
    with writer:
        if writer.complete:
            return HarvestResult(cfg.out, writer.n_contexts, writer.n_contexts * cfg.ctx_len, 0.0, 0.0, True)
        done = writer.n_contexts
        bar = _bar(cfg, cfg.n_contexts, done, f"harvest {','.join(cfg.hooks)}", progress)
        _fill(cfg, model, writer, itertools.islice(contexts, done, cfg.n_contexts), bar)
        writer.finish()
    seconds = time.perf_counter() - start
    harvested = (writer.n_contexts - done) * cfg.ctx_len
    _note_short_corpus(cfg, writer.n_contexts)
    return HarvestResult(cfg.out, writer.n_contexts, writer.n_contexts * cfg.ctx_len, seconds,
                         harvested / seconds if seconds else 0.0, False, harvested)


def store_identity(cfg: HarvestConfig) -> dict[str, object]:
    """What a store harvested by `cfg` is: its settings and the identity of the model's files (weights replaced
    under the same path make it another store; see `interplab.activations.inputs.model_identity`)."""
    return {**cfg.store_identity(), "model_files": model_identity(cfg.model)}


def _harvest_ranked(cfg: HarvestConfig, model: HookedModel, contexts: Iterator[torch.Tensor],
                    shapes: dict[str, tuple[int, int]], r: D.Ranks, progress: bool) -> HarvestResult:
    """This rank's part of a torchrun harvest: its own shards into OUT/rank-0000r/, then rank 0's merge."""
    top = ranked.check_ranked_out(cfg.out, r.world_size, cfg.resume)  # the same verdict on every rank
    if top is not None:
        # Complete: opening it as a writer checks it holds these settings (and changes nothing).
        StoreWriter(cfg.out, config=store_identity(cfg), hooks=list(cfg.hooks), shapes=shapes, dtype=cfg.dtype,
                    contexts_per_shard=cfg.shard_contexts, resume=True)
        return HarvestResult(cfg.out, top["n_contexts"], top["n_tokens"], 0.0, 0.0, True)
    D.barrier()  # every rank has read the folder before any rank writes to it
    config = {**store_identity(cfg), "rank": r.rank, "world_size": r.world_size}
    writer = ranked.on_every_rank(lambda: StoreWriter(
        ranked.rank_url(cfg.out, r.rank), config=config, hooks=list(cfg.hooks), shapes=shapes, dtype=cfg.dtype,
        contexts_per_shard=cfg.shard_contexts, resume=cfg.resume))
    start = time.perf_counter()
    with writer:
        done = writer.n_contexts
        if not writer.complete:
            mine = ranked.own_contexts(contexts, cfg.shard_contexts, r, done, cfg.n_contexts)
            bar = _bar(cfg, ranked.share(cfg.n_contexts, cfg.shard_contexts, r), done,
                       f"harvest {','.join(cfg.hooks)} (rank {r.rank} of {r.world_size})", progress and r.is_main)
            _fill(cfg, model, writer, mine, bar)
            writer.finish()
    # The sum is also the barrier after which every rank's store is complete.
    harvested = int(D.all_reduce_sum_(torch.tensor([writer.n_contexts - done], dtype=torch.float64)).item())
    # Rank 0 merges; the broadcast of its result is the final barrier: no rank returns before the store is readable.
    n_contexts = ranked.on_main(ranked.merge_rank_stores, cfg.out, r.world_size, writer.identity)
    seconds = time.perf_counter() - start
    if r.is_main:
        _note_short_corpus(cfg, n_contexts)
    tokens_per_s = harvested * cfg.ctx_len / seconds if seconds else 0.0
    return HarvestResult(cfg.out, n_contexts, n_contexts * cfg.ctx_len, seconds, tokens_per_s, False,
                         harvested * cfg.ctx_len)


def _contexts(cfg: HarvestConfig, model: HookedModel) -> Iterator[torch.Tensor]:
    """The deterministic context stream, its first context read now so that a bad corpus fails before writing."""
    contexts = iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split=cfg.split, seed=cfg.seed,
                             test_fraction=cfg.test_fraction)
    first = next(contexts, None)
    if first is None:
        raise InterplabError(f"corpus '{cfg.corpus}' ({cfg.split} split) yields no context of {cfg.ctx_len} tokens")
    return itertools.chain([first], contexts)


def _bar(cfg: HarvestConfig, total: int, done: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total * cfg.ctx_len, initial=done * cfg.ctx_len, unit="tok", unit_scale=True, desc=desc,
                disable=not show, smoothing=0.1)


def _fill(cfg: HarvestConfig, model: HookedModel, writer: StoreWriter, contexts: Iterator[torch.Tensor],
          bar: tqdm) -> None:
    """Run the model over `contexts` a batch at a time and add the activations to `writer`."""
    with bar, torch.inference_mode():
        for tokens in _batches(contexts, cfg.batch_size):
            cache = model.run_with_cache(tokens, cfg.hooks).cache
            writer.add({h: cache[h].to("cpu", DTYPES[cfg.dtype]) for h in cfg.hooks}, tokens)
            bar.update(tokens.numel())


def _note_short_corpus(cfg: HarvestConfig, n_contexts: int) -> None:
    if n_contexts < cfg.n_contexts:
        tqdm.write(f"note: the corpus ran out after {n_contexts} of {cfg.n_contexts} contexts")


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
