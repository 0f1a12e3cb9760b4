"""The training loop SPD and APD share: cosine learning rate, progress bar, atomic checkpoints, exact resume.

A checkpoint (CHECKPOINT_DIR/NAME.pt) holds the step, the trainable modules, the optimizer, the random generator's
state (it draws every batch and every mask, so a resumed run draws what an uninterrupted one would), the loss
history, the seconds trained and a digest of the target weights: a resume onto a changed target is refused.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic

LOG_EVERY = 50
"""Steps between entries of the loss history."""
StepLoss = Callable[[int], tuple[Tensor, dict[str, float]]]
"""step -> (the loss to minimise, its terms as floats)."""


class LoopResult(NamedTuple):
    """What `train` did."""

    history: list[dict[str, float]]
    """{"step", "lr", each loss term} every LOG_EVERY steps and at the last step."""
    seconds: float
    """Training wall time over every session of the run."""
    resumed_from: int
    """The step this call resumed from (0: fresh)."""


def cosine_lr(step: int, steps: int, lr: float) -> float:
    """lr · ½(1 + cos(π step / steps)): from lr down to 0."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def weights_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer of the target model (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(modules: nn.Module, step_loss: StepLoss, *, steps: int, lr: float, gen: torch.Generator,
          checkpoint: Path | None, checkpoint_every: int, digest: str, desc: str, progress: bool,
          lr_at: Callable[[int], float] | None = None) -> LoopResult:
    """Minimise step_loss(step) over the parameters of `modules` with Adam for `steps` steps, resuming from
    `checkpoint` if it exists (it must have been written for the same target: `digest`)."""
    opt = torch.optim.Adam(modules.parameters(), lr=lr)
    schedule = lr_at or (lambda s: cosine_lr(s, steps, lr))
    step, history, seconds_before = 0, [], 0.0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=next(modules.parameters()).device, weights_only=False)
        if state["digest"] != digest:
            raise InterplabError(f"{checkpoint} was written for other target weights; refusing to resume onto a "
                                 "changed model (delete the run folder to start again)")
        modules.load_state_dict(state["modules"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history, seconds_before = state["step"], state["history"], state["seconds"]
    resumed_from, start = step, time.perf_counter()

    def save() -> None:
        if checkpoint is None:
            return
        buf = io.BytesIO()
        torch.save({"step": step, "modules": modules.state_dict(), "optimizer": opt.state_dict(),
                    "generator": gen.get_state(), "history": history, "digest": digest,
                    "seconds": seconds_before + time.perf_counter() - start}, buf)
        write_url_atomic(str(checkpoint), buf.getvalue())

    bar = tqdm(total=steps, initial=step, desc=desc, disable=not progress)
    while step < steps:
        rate = schedule(step)
        for group in opt.param_groups:
            group["lr"] = rate
        loss, terms = step_loss(step)
        if not math.isfinite(float(loss.detach())):
            bar.close()
            raise InterplabError(f"{desc}: the loss became non-finite ({float(loss.detach())}) at step {step} "
                                 f"({', '.join(f'{k} {v:.3g}' for k, v in terms.items())}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % LOG_EVERY == 0 or step == steps:
            history.append({"step": step, "lr": rate, **terms})
            bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        if step % checkpoint_every == 0 or step == steps:
            save()
    bar.close()
    return LoopResult(history, seconds_before + time.perf_counter() - start, resumed_from)
