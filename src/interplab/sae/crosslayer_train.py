"""Train a sweep of cross-layer transcoders in one pass over a model's activations, resumably (`interplab transcoder
train`).

    from interplab.sae.crosslayer_config import CLTTrainConfig
    from interplab.sae.crosslayer_train import train_clt

    result = train_clt(CLTTrainConfig(model="smollm2-135m", k=[8, 16], d_sae=[1024], tokens=200_000, out="clts"))
    result.metrics["clt-topk-k16-f1024"]["fvu_per_layer"]

A step: the next batch of contexts runs the model once (stopped after the last layer's MLP output), every layer's
MLP input and output are read (scaled by their normalisation factors), and each CLT of the sweep takes its own Adam
step on the same rows (crosslayer_run.py). Under torchrun each rank runs the model on its share of the contexts and
the gradients are averaged (data_parallel.py), which equals one process on the whole batch up to float rounding.

The run folder is the SAE trainer's (checkpoint.py): train_config.json (the identity: a changed config is refused
in one line), checkpoint.pt (atomic; everything a step depends on, so that a resumed run ends bit-identical to an
uninterrupted one), one folder per CLT in circuit-tracer's CLT layout written whole under a temporary name
(normalisation folded in: it reads raw activations), and metrics.json, written last.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interplab import distributed as D
from interplab.errors import InterplabError
from interplab.fileio import join
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.runs import JSONDict, JSONValue, check_identity, check_output_folder, finite_json, folder_entries
from interplab.runs import folder_lock, read_json_object, write_json
from interplab.sae.checkpoint import CHECKPOINT, RUN_CONFIG, SUMMARY, Checkpoint, delete_checkpoint, load_checkpoint
from interplab.sae.checkpoint import remove_stale_tmp, save_checkpoint, save_sae_folder
from interplab.sae.circuit_tracer_files import save_circuit_tracer, topk_equivalent_threshold
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.crosslayer_config import CLTTrainConfig
from interplab.sae.crosslayer_data import ContextBatches, MLPRows, check_hooks, mlp_rows
from interplab.sae.crosslayer_run import CLTRun, Metrics

KIND = "transcoder train"
"""Recorded in train_config.json, so that an SAE run's folder is refused rather than resumed."""


class CLTTrainResult(NamedTuple):
    """What a call to `train_clt` did."""

    out: str
    names: list[str]
    """The CLTs of the sweep, in order; each is saved in OUT/<name>."""
    clts: dict[str, CrossLayerTranscoder]
    """The trained CLTs as trained (they read inputs × in_scales; the saved ones read raw activations). Empty if
    the run was already complete."""
    in_scales: list[float]
    out_scales: list[float]
    metrics: dict[str, Metrics]
    """Final metrics of each CLT (as in OUT/<name>/metrics.json, without the history)."""
    steps: int
    tokens: int
    tokens_per_s: float
    """Tokens trained in this call per second (model forward included; saving excluded)."""
    resumed_from: int
    already_complete: bool


def train_clt(cfg: CLTTrainConfig, *, model: HookedModel | None = None,
              token_batches: Sequence[Int[Tensor, "batch pos"]] | None = None, progress: bool = True,
              callback: Callable[[CLTTrainer], None] | None = None) -> CLTTrainResult:
    """Train the sweep `cfg` describes into cfg.out; `callback(trainer)` runs after each step (tests stop runs with
    it). `model` (already loaded) and `token_batches` (one [batch_size, ctx_len] batch per step) replace cfg.model
    and cfg.corpus; they must be what cfg describes: the run's identity, and so resuming, rests on cfg alone."""
    cfg.validate()
    ranks = D.ranks()
    if ranks.distributed:
        if cfg.batch_size % ranks.world_size:
            raise InterplabError(f"--batch-size {cfg.batch_size} does not split evenly over {ranks.world_size} "
                                 f"ranks; use a multiple of {ranks.world_size} (contexts per step, over all ranks)")
        D.init(D.rank_device(cfg.device))
    check_output_folder(cfg.out, "--out")
    identity = {"kind": KIND, **cfg.identity()}
    _inspect(cfg.out, identity)  # a foreign or changed folder is refused before the model loads
    model = model if model is not None else load_model(cfg.model, device=D.rank_device(cfg.device))
    check_hooks(model, cfg)
    data = ContextBatches(model, cfg, token_batches)
    with folder_lock(cfg.out, KIND) if ranks.is_main else nullcontext():
        status, checkpoint, summary = _inspect(cfg.out, identity)  # again: another process may have written it
        if ranks.distributed:
            D.barrier()  # every rank has read --out before rank 0 writes to it
        if status == "complete":
            s = summary or {}
            return CLTTrainResult(cfg.out, list(s.get("clts", {})), {}, list(s.get("in_scales", [])),
                                  list(s.get("out_scales", [])), dict(s.get("clts", {})), int(s.get("steps", 0)),
                                  int(s.get("tokens", 0)), 0.0, int(s.get("steps", 0)), True)
        if status == "partial" and not cfg.resume:
            at = f"checkpoint at step {checkpoint['step']}" if checkpoint else "no checkpoint yet"
            raise InterplabError(f"{cfg.out} holds a partial run ({at}); pass --resume to continue it, "
                                 "or delete it to start over")
        trainer = CLTTrainer(cfg, model, data, identity, checkpoint, ranks, progress=progress, callback=callback)
        return trainer.run()


def _inspect(out: str, identity: Mapping[str, JSONValue]) -> tuple[str, Checkpoint | None, JSONDict | None]:
    """(status, checkpoint, summary) of --out: 'new', 'partial' or 'complete'; a folder holding anything else, or
    this kind of run with other settings, is refused in one line naming the differences."""
    if check_identity(out, RUN_CONFIG, identity, "CLT") is None:
        return "new", None, None
    names = folder_entries(out)
    if SUMMARY in names:
        return "complete", None, read_json_object(join(out, SUMMARY))
    return "partial", load_checkpoint(out) if CHECKPOINT in names else None, None


class CLTTrainer:
    """The training loop of one run. Everything is checked before it is built."""

    def __init__(self, cfg: CLTTrainConfig, model: HookedModel, data: ContextBatches, identity: JSONDict,
                 checkpoint: Checkpoint | None, ranks: D.Ranks, *, progress: bool = True,
                 callback: Callable[[CLTTrainer], None] | None = None) -> None:
        self.cfg, self.model, self.data, self.identity, self.ranks = cfg, model, data, identity, ranks
        self.progress, self.callback = progress and ranks.is_main, callback
        self.n_layers, self.d_model = model.info.n_layers, model.info.d_model
        self.runs = {p.name: CLTRun(p, cfg, self.n_layers, self.d_model, model.device, ranks.world_size)
                     for p in cfg.sweep()}
        self.step = 0
        self.in_scales, self.out_scales = [1.0] * self.n_layers, [1.0] * self.n_layers
        self.rows: MLPRows | None = None
        """This rank's (normalised) rows of the latest step."""
        if checkpoint is not None:
            self._restore(checkpoint)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _restore(self, ckpt: Checkpoint) -> None:
        if sorted(ckpt["runs"]) != sorted(self.runs):
            raise InterplabError(f"the checkpoint in {self.cfg.out} holds CLTs {sorted(ckpt['runs'])}, this run "
                                 f"trains {sorted(self.runs)}; delete it to start over")
        for name, run in self.runs.items():
            run.load_state_dict(ckpt["runs"][name])
        self.step = int(ckpt["step"])
        self.in_scales, self.out_scales = list(ckpt["in_scales"]), list(ckpt["out_scales"])

    def _checkpoint(self) -> None:
        if self.ranks.is_main:
            save_checkpoint(self.cfg.out, {"config": self.identity, "step": self.step, "in_scales": self.in_scales,
                                           "out_scales": self.out_scales,
                                           "runs": {n: r.state_dict() for n, r in self.runs.items()}})
        if self.ranks.distributed:
            D.barrier()  # no rank runs ahead of a checkpoint

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> CLTTrainResult:
        """Train to the end (from the checkpoint, if resuming), save every CLT, and mark the run complete."""
        cfg, per_step = self.cfg, self.cfg.tokens_per_step
        resumed_from = self.step
        if self.ranks.is_main:
            remove_stale_tmp(cfg.out)
            write_json(join(cfg.out, RUN_CONFIG), self.identity)  # from here on, --out holds this run
        batches = self.data.batches(self.step)
        bar = tqdm(total=cfg.n_steps * per_step, initial=self.step * per_step, unit="tok", unit_scale=True,
                   desc=f"transcoder train {len(self.runs)} CLT(s)", disable=not self.progress)
        start = time.perf_counter()
        try:
            for step in range(self.step, cfg.n_steps):
                self._train_step(next(batches), step)
                bar.update(per_step)
                if self.step % cfg.log_every == 0 or self.step == cfg.n_steps:
                    logged = {n: r.log(self.step, self.step * per_step, cfg.lr_at(step), self.out_scales)
                              for n, r in self.runs.items()}
                    bar.set_postfix_str(" ".join(f"fvu={m['fvu']:.3f} l0={m['l0']:.1f} dead={m['dead_fraction']:.0%}"
                                                 for m in logged.values()), refresh=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.n_steps:
                    self._checkpoint()
                if self.callback:
                    self.callback(self)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        tokens_per_s = (self.step - resumed_from) * per_step / seconds if seconds > 0 else 0.0
        metrics = self._save(tokens_per_s)
        if self.ranks.distributed:
            D.barrier()  # on every rank, returning means the run folder is complete
        return CLTTrainResult(cfg.out, list(self.runs), {n: r.clt for n, r in self.runs.items()}, self.in_scales,
                              self.out_scales, metrics, cfg.n_steps, cfg.n_steps * per_step, tokens_per_s,
                              resumed_from, False)

    def _my_contexts(self, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "share pos"]:
        """This rank's contexts of the step's batch (all of them in one process)."""
        share = len(tokens) // self.ranks.world_size
        return tokens[self.ranks.rank * share:(self.ranks.rank + 1) * share]

    def _train_step(self, tokens: Int[Tensor, "batch pos"], step: int) -> None:
        """Run the model on this rank's contexts, then one step of every CLT on their rows."""
        raw = mlp_rows(self.model, self._my_contexts(tokens), self.cfg)
        if not all(bool(torch.isfinite(t).all()) for t in raw.xs + raw.ys):
            raise InterplabError(f"step {step + 1}: the model's MLP activations hold NaN/inf; {self._stopped()}")
        sums = self._batch_sums(raw)
        if step == 0:
            self._initialize(sums)
        rows = MLPRows([x * s for x, s in zip(raw.xs, self.in_scales)],
                       [y * t for y, t in zip(raw.ys, self.out_scales)])
        L, n, t = self.n_layers, sums[0], torch.tensor(self.out_scales, dtype=torch.float64, device=sums.device)
        y_sq, y_sum = sums[1 + L:1 + 2 * L], sums[1 + 2 * L:].view(L, -1)
        total_var = (y_sq - y_sum.pow(2).sum(-1) / n) * t**2  # Σ_b ‖ỹ_b − mean ỹ‖² of the whole batch, per layer
        for name, run in self.runs.items():
            if not run.train_step(rows.xs, rows.ys, total_var, self.cfg.lr_at(step)):
                raise InterplabError(f"step {step + 1}: the loss of {name} is not finite; {self._stopped()}; "
                                     "try a lower --lr")
        self.step, self.rows = step + 1, rows

    def _batch_sums(self, raw: MLPRows) -> Float[Tensor, " n"]:
        """[rows, Σ‖x_l‖² per layer, Σ‖y_l‖² per layer, Σ y_l per layer] over the whole batch (summed over ranks),
        in float64: the normalisation, b_dec's start and the target variance come from them."""
        sums = torch.cat([torch.tensor([len(raw.xs[0])], dtype=torch.float64, device=raw.xs[0].device),
                          torch.stack([x.double().pow(2).sum() for x in raw.xs]),
                          torch.stack([y.double().pow(2).sum() for y in raw.ys]),
                          torch.cat([y.double().sum(0) for y in raw.ys])])
        return D.all_reduce_sum_(sums) if self.ranks.distributed else sums

    def _initialize(self, sums: Float[Tensor, " n"]) -> None:
        """Scales that make each layer's mean squared input and output norm d_model (normalize), and every CLT's
        b_dec the first batch's mean (normalised) output: the best constant prediction."""
        L, d, n = self.n_layers, self.d_model, float(sums[0])
        x_sq, y_sq, y_sum = sums[1:1 + L], sums[1 + L:1 + 2 * L], sums[1 + 2 * L:].view(L, d)
        if self.cfg.normalize:
            if not bool((x_sq > 0).all() and (y_sq > 0).all()):
                raise InterplabError("an MLP input or output of the model is zero on the whole first batch; "
                                     "nothing to normalise by (pass --no-normalize)")
            self.in_scales = [math.sqrt(d * n / float(v)) for v in x_sq]
            self.out_scales = [math.sqrt(d * n / float(v)) for v in y_sq]
        t = torch.tensor(self.out_scales, dtype=torch.float64, device=sums.device)
        for run in self.runs.values():
            with torch.no_grad():
                run.clt.b_dec.copy_(y_sum / n * t[:, None])

    def _stopped(self) -> str:
        return f"training stopped; rerun with --resume to continue from the last checkpoint in {self.cfg.out}"

    # ---- the end --------------------------------------------------------------------------------------------
    def _save(self, tokens_per_s: float) -> dict[str, Metrics]:
        """Save every CLT (normalisation folded in) with its config and metrics; then mark the run complete."""
        cfg = self.cfg
        finals = {name: {"name": name, "steps": cfg.n_steps, **run.history[-1], "tokens_per_s": tokens_per_s,
                         "dead_window_tokens": cfg.dead_window} for name, run in self.runs.items()}
        # The whole last batch on every rank (a collective), so that the TopK thresholds do not depend on the ranks.
        last_xs = [D.all_gather_cat(x) for x in self.rows.xs] if self.rows is not None else None
        if not self.ranks.is_main:
            return finals
        for name, run in self.runs.items():
            files = _CLTFiles(self._raw_clt(run.clt), cfg.model, _topk_thresholds(run.clt, last_xs))
            config = {"train_config": self.identity, "point": run.point._asdict(), "in_scales": self.in_scales,
                      "out_scales": self.out_scales}
            save_sae_folder(cfg.out, name, files, metadata={},  # type: ignore[arg-type]  # duck-typed .save
                            files={"train_config.json": config,
                                   "metrics.json": finite_json({**finals[name], "history": run.history})})
        write_json(join(cfg.out, SUMMARY), finite_json({
            "complete": True, "steps": cfg.n_steps, "tokens": cfg.n_steps * cfg.tokens_per_step,
            "tokens_per_s": tokens_per_s, "in_scales": self.in_scales, "out_scales": self.out_scales,
            "clts": finals}))
        delete_checkpoint(cfg.out)
        return finals

    def _raw_clt(self, clt: CrossLayerTranscoder) -> CrossLayerTranscoder:
        """A copy of `clt` that reads and writes raw activations (the scales folded in)."""
        raw = copy.deepcopy(clt).eval()
        raw.fold_scales(self.in_scales, self.out_scales)
        return raw

@torch.no_grad()
def _topk_thresholds(clt: CrossLayerTranscoder, xs: list[Float[Tensor, "rows d_model"]] | None
                     ) -> dict[int, float] | None:
    """topk: per layer, the JumpReLU threshold at which the mean L0 on the (normalised) inputs `xs` is k, so that
    circuit-tracer (which has no TopK) reads the nearest JumpReLU; our loader rebuilds the TopK itself."""
    if clt.activation != "topk" or xs is None:
        return None
    return {i: topk_equivalent_threshold(clt.pre_acts(i, x), clt.k) for i, x in enumerate(xs)}


class _CLTFiles:
    """A CLT as `checkpoint.save_sae_folder` saves it (an object with `.save(folder, metadata)`), in
    circuit-tracer's CLT layout, so that the folder is written whole under a temporary name and moved into place."""

    def __init__(self, clt: CrossLayerTranscoder, model_name: str, topk_threshold: dict[int, float] | None) -> None:
        self.clt, self.model_name, self.topk_threshold = clt, model_name, topk_threshold

    def save(self, folder: str, metadata: Mapping[str, JSONValue]) -> None:
        save_circuit_tracer(self.clt, folder, self.model_name, topk_threshold=self.topk_threshold)

