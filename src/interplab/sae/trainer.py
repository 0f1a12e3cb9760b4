"""Train a sweep of sparse autoencoders in one pass over the data, resumably.

    from interplab.sae.trainer import train
    from interplab.sae.train_config import TrainConfig

    result = train(TrainConfig(store="acts", arch="topk", k=[16, 32, 64], expansion=[16], out="saes"))
    result.metrics["topk-k32-x16"]["fvu"]

Every SAE of the sweep sees the same batches and has its own Adam optimiser. A step is: read a batch (scaled by
the normalisation factor), then for each SAE: forward, loss, backward, optimiser step with the decoder-norm
constraint, dead-latent counters. With `--target` the batches are pairs (x, target) and every SAE is trained as a
transcoder (target and input normalised by scales of their own, both folded in on save). Checkpoints hold
everything a step depends on, so that `resume=True` ends with the same weights, bit for bit, as a run that was
never interrupted. See `checkpoint.py` for the run folder.
"""

from __future__ import annotations

import copy
import itertools
import math
import posixpath
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict
from types import ModuleType

import torch
from torch import Tensor
from tqdm.auto import tqdm

from interplab import distributed as D
from interplab.activations.store import CorruptShardError, NonFiniteShardError
from interplab.errors import InterplabError
from interplab.fileio import join
from interplab.runs import check_output_folder, folder_lock, write_json
from interplab.sae.base import SparseAutoencoder
from interplab.sae.checkpoint import (
    RUN_CONFIG,
    SUMMARY,
    Checkpoint,
    delete_checkpoint,
    inspect_run_folder,
    refuse_changed_store,
    remove_stale_tmp,
    save_checkpoint,
    save_sae_folder,
)
from interplab.sae.config import SAEConfig
from interplab.sae.sae_run import SAERun
from interplab.sae.sharded import ShardedTopKSAE
from interplab.sae.sources import Batch, BatchSource, open_source, run_identity
from interplab.sae.train_config import TrainConfig
from interplab.sae.train_result import Metrics, TrainResult, batch_parts, check_data_parallel, import_wandb
from interplab.sae.transcoder import Transcoder
from interplab.sae.transcoder_init import fit_initial_scale_

INIT_TOKENS = 65_536
"""Tokens (whole batches, at most the whole run) from which the normalisation scale and b_dec are estimated."""

def train(cfg: TrainConfig, source: BatchSource | None = None, *, progress: bool = True,
          callback: Callable[[Trainer], None] | None = None, data_parallel: bool = True) -> TrainResult:
    """Train the sweep `cfg` describes; `callback(trainer)` runs after each step (tests use it to stop a run).

    The batches come from `source`, or (when it is None) from the store or the model run `cfg` names (sources.py).
    Synthetic mode (cfg.synthetic) needs the source built by its caller, above this package:
    `train(cfg, source=interplab.synth.sources.synthetic_source(cfg))`. A given source must be the data `cfg`
    describes: the run folder's identity, and so resuming, rests on `cfg` alone.

    Under torchrun the run is data-parallel over the ranks (unless `data_parallel=False`, which trains on this
    rank alone): each rank trains on its share of every batch, the gradients are averaged (data_parallel.py), and
    rank 0 writes the checkpoints and the results. The checkpoint does not depend on the number of ranks, so a run
    may resume on a different number of them.
    """
    cfg.validate()
    if cfg.hooks:
        raise InterplabError("this config trains one run per hook (--hooks): call interplab.sae.per_hook.train_hooks")
    if cfg.synthetic is not None and source is None:
        raise InterplabError(f"--synthetic {cfg.synthetic}: the caller must build the batch source, "
                             "train(cfg, source=interplab.synth.sources.synthetic_source(cfg)); the SAE trainer "
                             "does not import the planted-truth lab")
    ranks = D.ranks() if data_parallel else D.Ranks(0, 1, 0)
    if ranks.distributed:
        check_data_parallel(cfg, ranks)
        D.init(D.rank_device(cfg.device))
    wandb = import_wandb() if cfg.wandb_project and ranks.is_main else None
    check_output_folder(cfg.out, "--out")
    identity = run_identity(cfg)
    refuse_changed_store(cfg.out, cfg.store, identity)
    inspect_run_folder(cfg.out, identity)  # a foreign folder is refused before the lock writes into it
    # Rank 0 alone writes the run folder; its lock keeps a second `sae train` from writing the same one.
    with folder_lock(cfg.out, "sae train") if ranks.is_main else nullcontext():
        return _train_locked(cfg, identity, source, ranks, wandb, progress, callback)


def _train_locked(cfg: TrainConfig, identity: dict[str, object], source: BatchSource | None, ranks: D.Ranks,
                  wandb: ModuleType | None, progress: bool, callback: Callable[[Trainer], None] | None
                  ) -> TrainResult:
    """The rest of `train`, with --out locked (on rank 0)."""
    folder = inspect_run_folder(cfg.out, identity)  # again: another process may have written it meanwhile
    if ranks.distributed:
        D.barrier()  # every rank has read --out before rank 0 writes to it
    if folder.status == "complete":
        s = folder.summary or {}
        return TrainResult(cfg.out, list(s.get("saes", {})), {}, float(s.get("input_scale", 1.0)),
                           dict(s.get("saes", {})), int(s.get("steps", 0)), int(s.get("tokens", 0)), 0.0,
                           int(s.get("steps", 0)), True)
    if folder.status == "partial" and not cfg.resume:
        at = f"checkpoint at step {folder.checkpoint['step']}" if folder.checkpoint else "no checkpoint yet"
        raise InterplabError(f"{cfg.out} holds a partial run ({at}); pass --resume to continue it, "
                             "or delete it to start over")
    trainer = Trainer(cfg, folder.checkpoint, source, progress=progress, callback=callback, ranks=ranks,
                      identity=identity)
    return trainer.run(wandb)


class Trainer:
    """The training loop of one run. Everything is checked in __init__, before anything is written."""

    def __init__(self, cfg: TrainConfig, checkpoint: Checkpoint | None, source: BatchSource | None = None, *,
                 progress: bool = True, callback: Callable[[Trainer], None] | None = None,
                 ranks: D.Ranks = D.Ranks(0, 1, 0), identity: dict[str, object] | None = None) -> None:
        self.cfg, self.callback, self.ranks = cfg, callback, ranks
        self.identity = identity if identity is not None else cfg.identity()
        """What train_config.json and the checkpoint record of the run (`sources.run_identity`)."""
        self.progress = progress and ranks.is_main
        self.latent_shards = ranks.world_size if cfg.shard_latents else 1
        """Ranks each SAE's latents are split over (--shard-latents under torchrun; 1 otherwise)."""
        self.batch_ranks = 1 if cfg.shard_latents else ranks.world_size
        """Ranks each batch is split over (data-parallel training; 1 otherwise)."""
        self.device = torch.device(D.rank_device(cfg.device))
        self.source = source if source is not None else open_source(cfg)
        self.d_in = self.source.d_in
        self.target: str | None = getattr(self.source, "target", None)
        """The hook the transcoders reconstruct (None: SAEs)."""
        if self.target != cfg.target:
            raise InterplabError(f"--target is {cfg.target}, but the batch source's target is {self.target}")
        tokens = cfg.tokens or self._tokens_per_pass()
        if tokens is None:
            raise InterplabError(f"{self.source.describe} is endless: give --tokens")
        self.n_steps = cfg.n_steps(tokens)
        self.dead_window = cfg.dead_window(self.n_steps)
        points = cfg.sweep(self.d_in)
        for point in points:
            point.cfg.hook_name, point.cfg.model = self.source.hook, self.source.model_spec
            point.cfg.validate()
        self.runs = {p.name: SAERun(p.name, p.cfg, self.device, cfg.lr, cfg.seed, self.batch_ranks,
                                    sae=self._sharded(p.cfg), skip=cfg.skip) for p in points}
        self.step, self.scale, self.target_scale = 0, 1.0, 1.0
        self.batch: torch.Tensor | None = None
        """The (normalised) batch of the latest step, for callbacks."""
        self.target_batch: torch.Tensor | None = None
        """Its (normalised) targets, with --target."""
        if checkpoint is not None:
            self._restore(checkpoint)

    def _sharded(self, cfg: SAEConfig) -> ShardedTopKSAE | None:
        """This rank's slice of a latent-sharded SAE, or None (SAERun then builds the whole SAE)."""
        if self.latent_shards == 1:
            return None
        return ShardedTopKSAE(cfg, self.ranks.rank, self.latent_shards)

    def _tokens_per_pass(self) -> int | None:
        """Tokens of whole batches in one pass over the source's data; None for an endless source (a generator)."""
        return getattr(self.source, "tokens_per_pass", None)  # optional in the BatchSource protocol

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _restore(self, ckpt: Checkpoint) -> None:
        where = f"the checkpoint in {self.cfg.out}"
        if ckpt.get("latent_shards", 1) != self.latent_shards:
            raise InterplabError(f"{where} holds SAEs whose latents are split over {ckpt.get('latent_shards', 1)} "
                                 f"rank(s), this run splits them over {self.latent_shards}: resume with the same "
                                 "number of ranks (torchrun --nproc_per_node)")
        if ckpt["d_in"] != self.d_in:
            raise InterplabError(f"{self.source.describe} has width d={self.d_in}, but {where} was trained on "
                                 f"d_in={ckpt['d_in']}; point --out elsewhere or use the original data")
        if sorted(ckpt["runs"]) != sorted(self.runs):
            raise InterplabError(f"{where} holds SAEs {sorted(ckpt['runs'])}, this run trains {sorted(self.runs)}; "
                                 "delete it to start over")
        for name, run in self.runs.items():
            state = ckpt["runs"][name]
            run.load_state_dict(state[self.ranks.rank] if self.latent_shards > 1 else state)
        self.step, self.scale = int(ckpt["step"]), float(ckpt["scale"])
        self.target_scale = float(ckpt.get("target_scale", 1.0))
        torch.set_rng_state(ckpt["torch_rng"])

    def _checkpoint(self) -> None:
        """Rank 0 writes the checkpoint: the state every rank shares, or (latent-sharded) every rank's slice."""
        self.last_checkpoint = self.step
        runs = {name: run.state_dict() for name, run in self.runs.items()}
        saved: dict[str, object] | None = runs
        if self.latent_shards > 1:
            per_rank = D.gather_objects(runs)
            saved = {name: [states[name] for states in per_rank] for name in self.runs} if per_rank else None
        if self.ranks.is_main:
            save_checkpoint(self.cfg.out, {
                "config": self.identity, "d_in": self.d_in, "step": self.step, "scale": self.scale,
                "target_scale": self.target_scale,
                "torch_rng": torch.get_rng_state(), "runs": saved, "latent_shards": self.latent_shards,
            })
        if self.ranks.distributed:
            D.barrier()  # no rank runs ahead of a checkpoint (a rank stopped now resumes from this one)

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, wandb: ModuleType | None = None) -> TrainResult:
        """Train to the end (from the checkpoint, if resuming), save every SAE, and mark the run complete."""
        cfg, B = self.cfg, self.cfg.batch_size
        resumed_from = self.step
        self.last_checkpoint = self.step if resumed_from else None
        batches = self.source.batches(self.step)
        if self.step == 0:
            torch.manual_seed(cfg.seed)
            batches = self._initialize(batches)
        if self.ranks.is_main:
            remove_stale_tmp(cfg.out)
            write_json(join(cfg.out, RUN_CONFIG), self.identity)  # from here on, --out holds this run
        per_pass = self._tokens_per_pass()
        if self.progress and per_pass and self.n_steps * B > per_pass and resumed_from == 0:
            tqdm.write(f"note: {self.source.describe} holds {per_pass:,} tokens of whole batches; training on "
                       f"{self.n_steps * B:,} tokens makes {self.n_steps * B / per_pass:.1f} passes over it")
        logger = wandb.init(project=cfg.wandb_project, name=posixpath.basename(cfg.out.rstrip("/")),
                            config=asdict(cfg)) if wandb else None
        bar = tqdm(total=self.n_steps * B, initial=self.step * B, unit="tok", unit_scale=True, smoothing=0.1,
                   desc=f"sae train {next(iter(self.runs)) if len(self.runs) == 1 else f'{len(self.runs)} SAEs'}",
                   disable=not self.progress)
        start, last_postfix = time.perf_counter(), 0.0
        try:
            for step in range(self.step, self.n_steps):
                x = self._next_batch(batches, step)
                self._train_step(x, step)
                bar.update(B)
                if cfg.resample_every and self.step % cfg.resample_every == 0 and self.step < self.n_steps:
                    for run in self.runs.values():
                        # the normalised batch, as the SAEs see it
                        run.resample(self.batch, self.dead_window, self.target_batch)
                if self.step % cfg.log_every == 0 or self.step == self.n_steps:
                    lr = cfg.lr_at(step, self.n_steps)
                    logged = {n: r.log(self.step, self.step * B, lr, self.scale, self.dead_window)
                              for n, r in self.runs.items()}
                    if logger:
                        logger.log({f"{n}/{k}": v for n, e in logged.items() for k, v in e.items()}, step=self.step)
                    bar.set_postfix_str(self._postfix(start, resumed_from, logged), refresh=False)
                elif time.perf_counter() - last_postfix > 1.0:
                    last_postfix = time.perf_counter()
                    bar.set_postfix_str(self._postfix(start, resumed_from), refresh=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.n_steps:
                    self._checkpoint()
                if self.callback:
                    self.callback(self)
        finally:
            bar.close()
            if logger:
                logger.finish()
        seconds = time.perf_counter() - start
        tokens_per_s = (self.step - resumed_from) * B / seconds if seconds > 0 else 0.0
        metrics = self._save(tokens_per_s)
        if self.ranks.distributed:
            D.barrier()  # on every rank, returning means the run folder is complete
        return TrainResult(cfg.out, list(self.runs), {n: r.sae for n, r in self.runs.items()}, self.scale, metrics,
                           self.n_steps, self.n_steps * B, tokens_per_s, resumed_from, False)

    def _initialize(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Estimate the normalisation scales and initialise every SAE from the first batches (b_dec from the
        target's, a transcoder's decoder bias lives in the target's space); return the batch iterator with those
        batches put back in front."""
        n = min(self.n_steps, math.ceil(INIT_TOKENS / self.cfg.batch_size))
        head = [self._next_batch(batches, i) for i in range(n)]
        samples = [torch.cat(part).to(self.device, torch.float32) for part in zip(*map(batch_parts, head))]
        if self.cfg.normalize:
            self.scale = self._scale(samples[0])
            self.target_scale = self._scale(samples[-1]) if self.target else 1.0
        x = samples[0] * self.scale
        y = samples[-1] * self.target_scale if self.target else None
        for run in self.runs.values():
            run.sae.initialize(x if y is None else y, b_dec_init=self.cfg.b_dec_init, seed=self.cfg.seed)
            if y is not None and self.cfg.transcoder_init == "fitted":
                fit_initial_scale_(run.sae, x, y)
        return itertools.chain(head, batches)

    def _scale(self, sample: Tensor) -> float:
        """The factor that makes the sample's mean squared norm d_in."""
        mean_sq = float(sample.double().pow(2).sum(-1).mean())
        if not mean_sq > 0:
            raise InterplabError(f"the activations of {self.source.describe} are all zero; nothing to train on")
        return math.sqrt(self.d_in / mean_sq)

    def _next_batch(self, batches: Iterator[Batch], step: int) -> Batch:
        try:
            x = next(batches)
        except (NonFiniteShardError, CorruptShardError) as e:
            raise InterplabError(f"step {step + 1}: {e}; {self._stopped()}") from None
        if not all(bool(torch.isfinite(part).all()) for part in batch_parts(x)):
            raise InterplabError(f"step {step + 1}: the batch from {self.source.describe} holds NaN/inf "
                                 f"activations; {self._stopped()}")
        return x

    def _stopped(self) -> str:
        last = getattr(self, "last_checkpoint", None)
        kept = f"the last checkpoint (step {last}) is intact" if last else "no checkpoint was written"
        return f"training stopped, {kept}"

    def _train_step(self, batch: Batch, step: int) -> None:
        """One step of every SAE on `batch` (every rank reads the whole batch and trains on its share)."""
        x, *target = (part.to(self.device, torch.float32) for part in batch_parts(batch))
        if self.scale != 1.0:
            x = x * self.scale
        y = target[0] * self.target_scale if target else None
        reconstructed = x if y is None else y
        total_var = (reconstructed - reconstructed.mean(0)).pow(2).sum()
        lr, sparsity = self.cfg.lr_at(step, self.n_steps), self.cfg.sparsity_factor(step)
        share = len(x) // self.batch_ranks

        def mine(t: Tensor | None) -> Tensor | None:  # this rank's rows
            return t[self.ranks.rank * share:(self.ranks.rank + 1) * share] if t is not None and \
                self.batch_ranks > 1 else t
        for name, run in self.runs.items():
            if run.train_step(mine(x), total_var, lr, sparsity, self.dead_window, target=mine(y)) is None:
                raise InterplabError(f"step {step + 1}: the loss of {name} is not finite; {self._stopped()}; "
                                     "try a lower --lr")
        self.step, self.batch, self.target_batch = step + 1, x, y

    def _postfix(self, start: float, resumed_from: int, logged: dict[str, dict[str, float]] | None = None) -> str:
        elapsed = time.perf_counter() - start
        rate = (self.step - resumed_from) * self.cfg.batch_size / elapsed if elapsed > 0 else 0.0
        m = logged or {n: r.window_metrics(self.scale, self.dead_window) for n, r in self.runs.items()}

        def col(key: str, fmt: str) -> str:
            return "/".join(format(e[key], fmt) for e in m.values())

        return (f"tok/s={rate:,.0f} mse={col('mse', '.3g')} fvu={col('fvu', '.3f')} l0={col('l0', '.1f')} "
                f"dead={col('dead_fraction', '.1%')}")

    # ---- the end --------------------------------------------------------------------------------------------
    def _final_metrics(self, tokens_per_s: float) -> dict[str, Metrics]:
        target = {"target": self.target, "target_scale": self.target_scale} if self.target else {}
        return {name: {"name": name, "steps": self.n_steps, **run.history[-1], "tokens_per_s": tokens_per_s,
                       "input_scale": self.scale, "dead_window_tokens": self.dead_window, **target}
                for name, run in self.runs.items()}

    def _whole_sae(self, run: SAERun) -> SparseAutoencoder | Transcoder | None:
        """A copy of the whole SAE on rank 0 (gathered from every rank when latent-sharded), normalisation folded
        in; a transcoder with --target; None elsewhere."""
        if self.latent_shards > 1:
            sae = run.sae.gather_full()  # a collective: every rank calls it
        else:
            sae = copy.deepcopy(run.sae) if self.ranks.is_main else None
        if sae is None or self.target is None:
            if sae is not None and self.scale != 1.0:
                sae.fold_input_scale(self.scale)
            return sae
        W_skip = run.W_skip.detach().clone() if run.W_skip is not None else None
        transcoder = Transcoder(sae, self.target, W_skip)
        transcoder.fold_scales(self.scale, self.target_scale)
        return transcoder

    def _save(self, tokens_per_s: float) -> dict[str, Metrics]:
        """Save every SAE (normalisation folded in) with its config and metrics; then mark the run complete.
        Every rank calls it (a latent-sharded SAE is gathered to rank 0); only rank 0 writes."""
        cfg, finals = self.cfg, self._final_metrics(tokens_per_s)
        for name, run in self.runs.items():
            final = finals[name]
            sae = self._whole_sae(run)
            if sae is None:
                continue
            config = {"train_config": asdict(cfg), "sae_config": run.cfg.to_dict(), "input_scale": self.scale,
                      "source": self.source.describe}
            metadata = {"interplab_run": name, "input_scale_folded": self.scale, "trained_tokens": final["tokens"]}
            save_sae_folder(cfg.out, name, sae, metadata=metadata,
                            files={"train_config.json": config, "metrics.json": {**final, "history": run.history}})
        if not self.ranks.is_main:
            return finals
        write_json(join(cfg.out, SUMMARY), {"complete": True, "steps": self.n_steps,
                                            "tokens": self.n_steps * cfg.batch_size, "input_scale": self.scale,
                                            "target_scale": self.target_scale,
                                            "tokens_per_s": tokens_per_s, "saes": finals})
        delete_checkpoint(cfg.out)
        return finals

