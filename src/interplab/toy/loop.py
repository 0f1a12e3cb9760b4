"""The one training loop of the toy transformers (`interplab toy train`, `interplab beliefs train`), resumable exactly.

Each step sets the learning rate of that step, takes the loss of that step's batch (both functions of the step
alone, so a resumed run repeats what an uninterrupted one would do), and updates the model with the optimizer; then
`after_step(step, loss)` evaluates what is due and says whether to stop and whether to keep a checkpoint there.

Checkpoints live in OUT/checkpoints/step-N/ (N = steps trained): the model (ToyTransformer.save), optimizer.pt and
progress.json, written last, so a checkpoint without it is ignored. progress.json holds the step, the training
seconds so far, the kept steps and the caller's own state (`state()`, given back to `restore` on resume). A
checkpoint is written where `after_step` asks (kept), every `checkpoint_every` steps (periodic: only the newest is
kept, it is all a resume needs), and at the last step (kept). A run whose folder holds checkpoints resumes from the
newest one.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from interplab.fileio import write_url_atomic
from interplab.models.toy import ToyTransformer
from interplab.runs import JSONDict

CHECKPOINTS = "checkpoints"
"""The checkpoint folder inside a run folder."""
PROGRESS = "progress.json"
"""The file that completes a checkpoint (written last)."""


class StepOutcome(NamedTuple):
    """What `after_step` decided after a training step."""

    stop: bool = False
    """Stop training now (the step is the last one)."""
    checkpoint: bool = False
    """Keep a checkpoint at this step."""
    postfix: dict[str, str] | None = None
    """New numbers for the progress bar (None: leave them)."""


class LoopResult(NamedTuple):
    """What `train_loop` did."""

    steps: int
    """Steps trained in total, counting those before a resume."""
    resumed_from: int
    """The step of the checkpoint the loop resumed from (0: it started fresh)."""
    seconds: float
    """Training wall time over every session of the run."""
    checkpoints: list[int]
    """Steps of the checkpoints on disk at the end, in order."""


class TrainResult(NamedTuple):
    """What a toy training command (`run_toy_train`, `train_beliefs`) returns."""

    out: str
    """The run folder."""
    metrics: JSONDict
    """metrics.json of the run: its results."""
    resumed_from: int
    """The step this call resumed from (0: started fresh; the final step: the run was already complete)."""
    seconds: float
    """Wall time of this call."""


def checkpoint_dir(out: str | Path, step: int) -> Path:
    """OUT/checkpoints/step-N."""
    return Path(out) / CHECKPOINTS / f"step-{step}"


def saved_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (its progress.json written), in training order."""
    found = [(int(p.name[5:]), p) for p in (Path(out) / CHECKPOINTS).glob("step-*")
             if p.name[5:].isdigit() and (p / PROGRESS).is_file()]
    return sorted(found)


def train_loop(model: ToyTransformer, optimizer: torch.optim.Optimizer, out: str | Path, *, steps: int,
               learning_rate: Callable[[int], float], batch_loss: Callable[[int], torch.Tensor],
               after_step: Callable[[int, float], StepOutcome], state: Callable[[], JSONDict],
               restore: Callable[[JSONDict], None], begin: Callable[[int], bool] | None = None,
               checkpoint_every: int | None = None, progress: bool = True, desc: str = "train") -> LoopResult:
    """Train `model` for `steps` steps at most, resuming from the newest checkpoint in OUT (see the module docstring).

    learning_rate(s), batch_loss(s): the rate and the scalar loss of step s (0-based; batch_loss runs the model).
    after_step(n, loss): called after every update, n = steps done, loss = that step's training loss.
    state() / restore(dict): the caller's JSON state, saved with each checkpoint and handed back on resume.
    begin(n): called once before the first update with the step training starts from (after `restore`); True means
    the run is already stopped (e.g. a safety check failed at step 0)."""
    start = time.perf_counter()
    step, seconds_before, keep = 0, 0.0, set()
    done = saved_checkpoints(out)
    if done:
        step, path = done[-1]
        model.load_state_dict(ToyTransformer.load(path, device=model.device).state_dict())
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=model.device, weights_only=True))
        saved = json.loads((path / PROGRESS).read_text())
        seconds_before, keep = saved["seconds"], set(saved["keep"])
        restore(saved["state"])
    resumed_from = step
    model.train()

    def save_checkpoint(kept: bool) -> None:
        path = checkpoint_dir(out, step)
        if kept:
            keep.add(step)
        model.save(path)
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        write_url_atomic(str(path / "optimizer.pt"), buf.getvalue())
        progress_json = {"step": step, "seconds": seconds_before + time.perf_counter() - start,
                         "keep": sorted(keep), "state": state()}
        write_url_atomic(str(path / PROGRESS), json.dumps(progress_json).encode())  # last: marks it complete
        for old, old_path in saved_checkpoints(out):  # of the periodic ones only the newest is needed to resume
            if old != step and old not in keep:
                shutil.rmtree(old_path)

    stopped = begin(step) if begin else False
    bar = tqdm(total=steps, initial=step, disable=not progress, desc=desc)
    while step < steps and not stopped:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        loss = batch_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        outcome = after_step(step, float(loss.detach()))
        stopped = outcome.stop
        bar.update(1)
        if outcome.postfix is not None:
            bar.set_postfix(outcome.postfix)
        kept = outcome.checkpoint or stopped or step == steps
        if kept or (checkpoint_every and step % checkpoint_every == 0):
            save_checkpoint(kept)
    bar.close()
    saved = saved_checkpoints(out)
    if not saved or saved[-1][0] != step:
        save_checkpoint(True)  # a run resumed at its very end, or stopped before its first step
    model.eval()
    return LoopResult(step, resumed_from, seconds_before + time.perf_counter() - start,
                      [s for s, _ in saved_checkpoints(out)])
