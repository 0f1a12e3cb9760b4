"""The Fourier view of a modular-addition run (Nanda et al. 2023): how much of the number tokens' embedding lives in
a few frequencies, at every checkpoint, before and after grokking's jump in test accuracy.

    P(k) = Σ_d |Σ_{t<p} W_E[t, d] e^{−2πi k t / p}|²,  k = 0..p//2   (one-sided: k and p − k carry the same power)
    sparsity = share of the non-constant power (k ≥ 1) in the FOURIER_TOP strongest frequencies
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from interplab.errors import InterplabError
from interplab.models.toy import ToyTransformer
from interplab.toy.toy_run import ToyRun
from interplab.weights.extract import embedding

Tensor = torch.Tensor
FOURIER_TOP = 5
"""Frequencies counted in the Fourier sparsity number."""
JUMP_ACC = 0.5
"""Test accuracy that marks grokking's jump (as `interplab toy train` defines it)."""


def fourier_power(W_E: Float[Tensor, "vocab d_model"], p: int) -> Float[Tensor, " freq"]:
    """P(k) = Σ_d |Σ_{t<p} W_E[t, d] e^{−2πi k t/p}|² for k = 0..p//2 (k and p − k carry the same power)."""
    if W_E.shape[0] < p:
        raise InterplabError(f"the embedding has {W_E.shape[0]} rows; the Fourier view needs p = {p}")
    return torch.fft.rfft(W_E[:p].double().cpu(), dim=0).abs().pow(2).sum(-1).float()


def top_fraction(power: Float[Tensor, " freq"], top: int = FOURIER_TOP) -> float:
    """Share of the non-constant power (k ≥ 1) in the `top` strongest frequencies."""
    rest = power[1:]
    total = float(rest.sum())
    return float(rest.topk(min(top, rest.numel())).values.sum()) / total if total > 0 else 0.0


def fourier_view(run: ToyRun, p: int) -> dict[str, Any]:
    """Power per frequency for each checkpoint and the final model, and which checkpoint is before/after the jump."""
    final = _final_step(run)
    rows = [{"step": step, "folder": str(folder), "power": fourier_power(embedding(ToyTransformer.load(folder)), p)}
            for step, folder in run.checkpoints if step != final]  # the final checkpoint is model/
    rows.append({"step": final, "folder": str(run.path / "model"), "power": fourier_power(embedding(run.model), p)})
    for r in rows:
        r["top_fraction"], r["power"] = top_fraction(r["power"]), r["power"].tolist()
        r["top_frequencies"] = sorted(range(1, len(r["power"])), key=lambda k: -r["power"][k])[:FOURIER_TOP]
    jump = jump_step(run)
    # "before" is the last checkpoint before the jump (the memorised, not yet generalising model; an earlier one may
    # be the initialisation); without a known jump, the first checkpoint
    if jump is None:
        before = rows[:1] if len(rows) > 1 else []
    else:
        before = [r for r in rows[:-1] if r["step"] < jump]
    return {"p": p, "top": FOURIER_TOP, "jump_step": jump, "checkpoints": rows,
            "before": before[-1] if before else None, "after": rows[-1]}


def jump_step(run: ToyRun) -> int | None:
    """The step of the test-accuracy jump: metrics.json's `jump_step` when the trainer wrote one (None included: no
    jump), else the first logged step with test accuracy >= JUMP_ACC (the trainer's definition). Log lines carry the
    accuracy under "metrics" (phase evals) or at the top level, as test_acc or test_accuracy."""
    summary = run.metrics
    for key in ("jump_step", "grokking_jump_step"):
        if key in summary and (summary[key] is None or isinstance(summary[key], int)):
            return summary[key]
    for entry in sorted((e for e in run.log if isinstance(e.get("step"), int)), key=lambda e: e["step"]):
        values = {**entry, **(entry.get("metrics") or {})}
        acc = values.get("test_acc", values.get("test_accuracy"))
        if isinstance(acc, (int, float)) and acc >= JUMP_ACC:
            return entry["step"]
    return None


def _final_step(run: ToyRun) -> int:
    """The step of model/: the trainer's summary's `steps_trained`, else the last step logged or checkpointed."""
    steps = [s for s, _ in run.checkpoints] + [e["step"] for e in run.log if isinstance(e.get("step"), int)]
    summary = run.metrics.get("steps_trained")
    return summary if isinstance(summary, int) else max(steps, default=0)

