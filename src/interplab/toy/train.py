"""`interplab toy train`: a toy transformer trained on a task (synthetic/tasks.py) with phased evaluation.

Loss and accuracy count at the task's mask positions only (the read-off, the "=" token). Sampled tasks draw a fresh
batch every step, seeded by (seed, step), so a resumed run sees the batches an uninterrupted one would; modular
addition trains full-batch on its train split. AdamW (betas 0.9, 0.98), linear warmup then a constant rate.

Evaluation phases (synthetic/phases.py), defaults per task in TASK_DEFAULTS:
    qualification   train_acc, train_loss             every qualify_every steps from step 0 (cheap: 1024 sampled
                                                       examples, or the whole train split of modular addition)
    safety          loss_finite, weight_norm          every qualify_every steps; aborts training when the last
                                                       training loss is not finite or ‖θ‖₂ > max_weight_norm
    thorough        test_acc, test_loss,              every thorough_every steps from `thorough_when` (the model
                    worst_output_acc                   qualifies) until its gate `gate` passes; `stop_after` steps
                                                       after the gate, training stops (negative: never early)
test: eval_examples held-out samples (a seed no training step uses), or the whole test split of modular addition;
worst_output_acc is the lowest accuracy over the distinct answers (the weakest pair of ov-coherent).

Grokking's jump step: the first logged step at which thorough.test_acc >= 0.5. Test accuracy is only measured from
the thorough start, so a jump step equal to the thorough start means the model already generalised when it
memorised (no delay).

Run folder OUT: config.json (this config, task defaults filled in), log.jsonl (every eval and phase transition, with
"step"), model/ (ToyTransformer.save), train.json (summary), checkpoints/step-N/ (model + optimizer.pt +
progress.json, written last: a checkpoint without it is ignored) every checkpoint_every steps (only the newest
periodic one is kept), at each step a phase started, and at the end. Re-running the same config resumes from the
newest checkpoint; a different config in the same OUT is an error.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from interplab.errors import InterplabError
from interplab.toy.phases import Phase, Schedule
from interplab.toy.tasks import ModularAdditionTask, Task, TaskBatch, make_task

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # Attention-only, no LayerNorm (the read-outs stay linear). 2 heads of 5 learn ov-coherent exactly in ~150 steps;
    # one head learns it too, but only on some seeds within 3000 steps (it can sit on a plateau).
    "ov-coherent": dict(heads=2, d_head=5, d_model=32, d_mlp=0, steps=3000, batch_size=256, lr=3e-3,
                        weight_decay=0.01, init_std=0.1, thorough_when="qualification.train_acc >= 0.9",
                        stop_after=-1),
    "skip-trigram": dict(heads=1, d_head=8, d_model=32, d_mlp=0, steps=2000, batch_size=256, lr=3e-3,
                         weight_decay=0.01, init_std=0.1, thorough_when="qualification.train_acc >= 0.9",
                         stop_after=-1),
    # Nanda et al. (2023) shape (1 layer, ReLU MLP, no LayerNorm, full batch, AdamW wd 1.0), shrunk to run on a CPU
    # in minutes: p = 59, train fraction 0.35 (the task's defaults), d_model 64, d_mlp 256, lr 5e-3. Measured with
    # one thread: memorised (train acc >= 0.99) near step 250, test accuracy ~0.4 (commutativity: (b, a) of a train
    # pair is right) until ~900, then >= 0.9 by ~1300 and ~0.985 after; ~30 ms per step.
    "modular-addition": dict(heads=4, d_head=16, d_model=64, d_mlp=256, steps=4000, batch_size=0, lr=5e-3,
                             weight_decay=1.0, init_std=0.05, thorough_when="qualification.train_acc >= 0.99",
                             stop_after=300),
    "python": dict(heads=4, d_head=16, d_model=64, d_mlp=256, steps=2000, batch_size=256, lr=1e-3,
                   weight_decay=0.01, init_std=0.02, thorough_when="qualification.train_acc >= 0.9", stop_after=-1),
}
"""Settings a task uses where its config leaves them unset (None)."""
VOLATILE_FIELDS = ("device", "progress", "resume", "out")
"""Config fields that may differ between a run and its resumption."""
EVAL_SEED = 1 << 40
"""Seeds of the fixed evaluation samples (no training step's seed reaches it)."""


@dataclass
class ToyTrainConfig:
    """Train a toy transformer on a task, with cheap qualification evals all the time and thorough ones once the
    model qualifies."""

    task: str = "ov-coherent"
    """The task: ov-coherent, skip-trigram:k=4, modular-addition:p=59,train_fraction=0.3, or
    python:FILE.py:FUNCTION (settings after the colon are the task config's fields)."""
    n_layers: int = 1
    """Transformer blocks."""
    heads: int | None = None
    """Attention heads per block (unset: the task's default; ov-coherent 2)."""
    d_head: int | None = None
    """Width of each head (unset: the task's default; ov-coherent 5)."""
    d_model: int | None = None
    """Width of the residual stream (unset: the task's default)."""
    d_mlp: int | None = None
    """MLP width, 0 for an attention-only model (unset: the task's default: 0 for ov-coherent and skip-trigram,
    256 for modular-addition)."""
    act_fn: str = "relu"
    """MLP nonlinearity: relu, gelu or silu."""
    layer_norm: bool = False
    """LayerNorm before attention, MLP and unembedding (off: the residual stream stays linear in the read-outs)."""
    init_std: float | None = None
    """Standard deviation of the initial weights (unset: the task's default)."""
    steps: int | None = None
    """Training steps at most (unset: the task's default)."""
    batch_size: int | None = None
    """Sequences per step (unset: the task's default); modular addition always trains on its whole train split."""
    lr: float | None = None
    """AdamW learning rate after warmup (unset: the task's default)."""
    weight_decay: float | None = None
    """AdamW weight decay (unset: the task's default; 1.0 for modular-addition, as in Nanda et al. 2023)."""
    warmup: int = 50
    """Steps over which the learning rate rises linearly to lr."""
    qualify_every: int = 50
    """Steps between qualification (train accuracy and loss) and safety evals."""
    thorough_every: int = 50
    """Steps between thorough (held-out) evals while that phase is active."""
    thorough_when: str | None = None
    """Condition that starts the thorough phase (unset: the task's default, e.g. 'qualification.train_acc >= 0.9';
    'qualification.train_acc >= 0.99' for modular-addition, i.e. memorised)."""
    gate: str = "thorough.test_acc >= 0.99"
    """The thorough phase's gate: once it holds, the thorough phase ends."""
    stop_after: int | None = None
    """Steps to train on after the gate passed before stopping; negative: never stop early (unset: the task's
    default, 300 for modular-addition, never for the others)."""
    max_weight_norm: float = 1000.0
    """Safety gate: training aborts if the parameters' L2 norm exceeds this (or the loss is not finite)."""
    eval_examples: int = 4096
    """Held-out examples of the thorough evals (sampled tasks; modular addition uses its whole test split)."""
    checkpoint_every: int = 1000
    """Steps between resumable checkpoints."""
    seed: int = 0
    """Seed of the initialisation and of the data stream."""
    out: str = "toy-run"
    """Run folder: config.json, log.jsonl, model/, train.json, checkpoints/."""
    device: str | None = None
    """Device to train on (default: cuda if available, else cpu)."""
    progress: bool = True
    """Show a progress bar."""
    resume: bool = True
    """Continue the run already in OUT (it must have the same config); --no-resume refuses to touch it."""

    def resolved(self) -> ToyTrainConfig:
        """A copy with every unset field filled in from the task's defaults (validated)."""
        kind = "python" if self.task.startswith("python:") else self.task.partition(":")[0]
        defaults = TASK_DEFAULTS.get(kind, TASK_DEFAULTS["python"])
        cfg = replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("n_layers", "heads", "d_head", "d_model", "steps", "warmup", "qualify_every", "thorough_every",
                     "eval_examples", "checkpoint_every", "batch_size", "d_mlp"):
            value = getattr(self, name)
            low = 0 if name in ("warmup", "batch_size", "d_mlp") else 1
            if value is not None and value < low:
                raise InterplabError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
        for name in ("lr", "init_std", "max_weight_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InterplabError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise InterplabError(f"--weight-decay must be >= 0, got {self.weight_decay}")


# ---- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def task_metrics(model: torch.nn.Module, batch: TaskBatch) -> dict[str, float]:
    """acc, loss and worst_output_acc of the model at the batch's mask positions (batch already on its device)."""
    logits = model(batch.tokens)[batch.mask]  # [n_counted, d_vocab]
    targets = batch.targets[batch.mask]
    right = (logits.argmax(-1) == targets).float()
    classes, index = targets.unique(return_inverse=True)
    per_class = torch.zeros(len(classes), device=right.device).index_add_(0, index, right)
    per_class /= torch.bincount(index, minlength=len(classes))
    return {"acc": float(right.mean()), "loss": float(torch.nn.functional.cross_entropy(logits.float(), targets)),
            "worst_output_acc": float(per_class.min())}


class Measured:
    """A split's metrics, computed at most once per training step (several evals read the same forward pass)."""

    def __init__(self, model: torch.nn.Module, batch: TaskBatch, clock: dict[str, int]):
        self.model, self.batch, self.clock = model, batch, clock
        self._at, self._values = -1, {}

    def __call__(self, metric: str) -> float:
        if self._at != self.clock["step"]:
            self.model.eval()
            self._values, self._at = task_metrics(self.model, self.batch), self.clock["step"]
            self.model.train()
        return self._values[metric]


def eval_batches(task: Task, cfg: ToyTrainConfig) -> tuple[TaskBatch, TaskBatch]:
    """(qualification batch, held-out test batch) on the CPU."""
    if isinstance(task, ModularAdditionTask):
        return task.train_batch(), task.test_batch()
    gen = torch.Generator().manual_seed(cfg.seed + EVAL_SEED)
    return task.sample(1024, gen), task.sample(cfg.eval_examples, gen)


def build_schedule(cfg: ToyTrainConfig, model: torch.nn.Module, train: Measured, test: Measured,
                   last_loss: dict[str, float], log: Any) -> Schedule:
    """The three phases of the module docstring."""
    def weight_norm() -> float:
        return float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in model.parameters())))

    assert cfg.thorough_when is not None and cfg.stop_after is not None
    return Schedule([
        Phase("qualification", {"train_acc": lambda: train("acc"), "train_loss": lambda: train("loss")},
              every=cfg.qualify_every),
        Phase("safety", {"loss_finite": lambda: float(math.isfinite(last_loss["loss"])), "weight_norm": weight_norm},
              every=cfg.qualify_every,
              abort_when=f"safety.loss_finite < 1 or safety.weight_norm > {cfg.max_weight_norm}"),
        Phase("thorough", {"test_acc": lambda: test("acc"), "test_loss": lambda: test("loss"),
                           "worst_output_acc": lambda: test("worst_output_acc")},
              every=cfg.thorough_every, starts_when=cfg.thorough_when, ends_when=cfg.gate,
              stop_after=cfg.stop_after if cfg.stop_after >= 0 else None),
    ], log=log)


def jump_step(log: list[dict[str, Any]], metric: str = "test_acc", threshold: float = 0.5) -> int | None:
    """The first logged step at which thorough.<metric> >= threshold (None: never)."""
    for record in log:
        if record.get("event") == "eval" and record.get("metrics", {}).get(metric, -math.inf) >= threshold:
            return int(record["step"])
    return None


def read_log(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---- the run -------------------------------------------------------------------------------------------------------
def build_model(cfg: ToyTrainConfig, task: Task) -> Any:
    from interplab.models.toy import ToyConfig, ToyTransformer

    toy = ToyConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.heads, d_head=cfg.d_head,
                    d_mlp=cfg.d_mlp or None, n_ctx=task.n_ctx, d_vocab=task.d_vocab, act_fn=cfg.act_fn,
                    layer_norm=cfg.layer_norm, init_std=cfg.init_std, seed=cfg.seed)
    return ToyTransformer(toy, spec=f"toy:{task.spec()}")


def training_batch(task: Task, cfg: ToyTrainConfig, step: int) -> TaskBatch:
    """The batch of step `step` (0-based): a function of (seed, step) alone, so that resuming repeats it."""
    if isinstance(task, ModularAdditionTask):
        return task.train_batch()
    return task.sample(cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))


def masked_loss(model: torch.nn.Module, batch: TaskBatch) -> torch.Tensor:
    """Mean cross-entropy over the mask positions."""
    return torch.nn.functional.cross_entropy(model(batch.tokens)[batch.mask], batch.targets[batch.mask])


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step}"


def saved_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (progress.json written), in training order."""
    found = [(int(p.name[5:]), p) for p in (Path(out) / "checkpoints").glob("step-*")
             if p.name[5:].isdigit() and (p / "progress.json").is_file()]
    return sorted(found)


def _check_previous(out: Path, cfg: ToyTrainConfig) -> bool:
    """Whether OUT holds a run of this config (an error if it holds another's)."""
    path = out / "config.json"
    if not path.is_file():
        if saved_checkpoints(out):
            raise InterplabError(f"{out} holds checkpoints but no config.json; use a new --out")
        return False
    old, new = json.loads(path.read_text()), asdict(cfg)
    diff = [f"--{k.replace('_', '-')} {old.get(k)!r} → {new[k]!r}" for k in new
            if k not in VOLATILE_FIELDS and old.get(k) != new[k]]
    if diff:
        raise InterplabError(f"{out} holds a run with a different config ({'; '.join(diff)}); use a new --out, or "
                             "the same options to resume it")
    if not cfg.resume:
        raise InterplabError(f"{out} already holds a run; pass --resume to continue it, or use a new --out")
    return True


def run_toy_train(config: ToyTrainConfig) -> dict[str, Any]:
    """Train (or resume, or find complete) the run `config` describes; returns train.json's summary plus
    "resumed_from" and "seconds" (this call's wall time)."""
    from tqdm.auto import tqdm

    from interplab.fileio import write_url_atomic
    from interplab.models.toy import ToyTransformer

    start = time.perf_counter()
    task = make_task(config.task)
    cfg = config.resolved()
    out = Path(cfg.out)
    if _check_previous(out, cfg) and (out / "train.json").is_file():
        summary = json.loads((out / "train.json").read_text())
        if summary.get("complete"):
            return {**summary, "resumed_from": summary["steps_trained"], "seconds": time.perf_counter() - start}
    write_url_atomic(str(out / "config.json"), json.dumps(asdict(cfg), indent=1).encode())

    from interplab.models.load import default_device

    device = torch.device(cfg.device or default_device())
    model = build_model(cfg, task).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    clock, last_loss = {"step": 0}, {"loss": 0.0}
    train_b, test_b = (TaskBatch(*(t.to(device) for t in b)) for b in eval_batches(task, cfg))
    train_m, test_m = Measured(model, train_b, clock), Measured(model, test_b, clock)
    log_path = out / "log.jsonl"

    def log(record: dict[str, Any]) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    schedule = build_schedule(cfg, model, train_m, test_m, last_loss, log)
    progress: dict[str, Any] = {"step": 0, "loss_curve": [], "keep": [], "seconds": 0.0}
    done = saved_checkpoints(out)
    if done:
        path = done[-1][1]
        model.load_state_dict(ToyTransformer.load(path, device=device).state_dict())
        model.train()
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        progress = json.loads((path / "progress.json").read_text())
        schedule.load_state_dict(progress.pop("schedule"))
        last_loss["loss"] = progress["last_loss"]
    # The log holds exactly what happened up to the checkpoint: drop what an interrupted run wrote after it.
    kept = [r for r in read_log(out) if r["step"] <= progress["step"]] if done else []
    write_url_atomic(str(log_path), "".join(json.dumps(r) + "\n" for r in kept).encode())
    resumed_from, step, seconds_before = progress["step"], progress["step"], progress["seconds"]

    def save_checkpoint(keep: bool) -> None:
        path = checkpoint_dir(out, step)
        if keep:
            progress["keep"] = sorted(set(progress["keep"]) | {step})
        model.save(path)
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        write_url_atomic(str(path / "optimizer.pt"), buf.getvalue())
        state = {**progress, "step": step, "last_loss": last_loss["loss"], "schedule": schedule.state_dict(),
                 "seconds": seconds_before + time.perf_counter() - start}
        write_url_atomic(str(path / "progress.json"), json.dumps(state).encode())  # last: marks it complete
        for old, old_path in saved_checkpoints(out):  # of the periodic ones only the newest is needed to resume
            if old != step and old not in progress["keep"]:
                shutil.rmtree(old_path)

    if step == 0:
        schedule.evaluate(0)
    stopped = schedule.stop_reason is not None
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc=f"toy {task.name}")
    while step < cfg.steps and not stopped:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        batch = TaskBatch(*(t.to(device) for t in training_batch(task, cfg, step)))
        loss = masked_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        clock["step"], last_loss["loss"] = step, float(loss.detach())
        if step % cfg.qualify_every == 0:
            progress["loss_curve"].append([step, last_loss["loss"]])
            bar.set_postfix({k: f"{v:.3g}" for m in schedule.latest.values() for k, v in m.items()})
        stopped = schedule.evaluate(step, last=step == cfg.steps)
        bar.update(1)
        started_now = any(s.started == step for s in schedule.states.values())
        if started_now or stopped or step == cfg.steps or step % cfg.checkpoint_every == 0:
            save_checkpoint(keep=started_now or stopped or step == cfg.steps)
    bar.close()
    if not saved_checkpoints(out) or saved_checkpoints(out)[-1][0] != step:
        save_checkpoint(keep=True)   # a run resumed at its very end, or stopped at step 0
    model.eval()
    model.save(out / "model")
    final = {"train_" + k: v for k, v in task_metrics(model, train_b).items()}
    final |= {"test_" + k: v for k, v in task_metrics(model, test_b).items()}
    records = read_log(out)
    summary = {
        "config": asdict(cfg), "task": task.spec(), "complete": True, "steps_trained": step,
        "status": "aborted" if (schedule.stop_reason or "").startswith("aborted") else
                  "stopped early" if schedule.stop_reason else "completed",
        "stop_reason": schedule.stop_reason, "final": final,
        "phase_starts": {n: s.started for n, s in schedule.states.items()},
        "gates_passed": {n: s.ended for n, s in schedule.states.items() if s.ended is not None},
        "jump_step": jump_step(records), "jump_definition": "first logged step with thorough.test_acc >= 0.5",
        "checkpoints": [s for s, _ in saved_checkpoints(out)], "loss_curve": progress["loss_curve"],
        "train_seconds": seconds_before + time.perf_counter() - start,
    }
    write_url_atomic(str(out / "train.json"), (json.dumps(summary, indent=1) + "\n").encode())
    return {**summary, "resumed_from": resumed_from, "seconds": time.perf_counter() - start}


def format_summary(result: dict[str, Any]) -> str:
    f, starts = result["final"], result["phase_starts"]
    lines = [f"task {result['task']}: {result['status']} after {result['steps_trained']} steps"
             + (f" ({result['stop_reason']})" if result["stop_reason"] else "")
             + (f", resumed at step {result['resumed_from']}" if result.get("resumed_from") else ""),
             f"train acc {f['train_acc']:.4f} loss {f['train_loss']:.4f}   test acc {f['test_acc']:.4f} "
             f"loss {f['test_loss']:.4f}   worst output acc {f['test_worst_output_acc']:.4f}",
             f"thorough phase started at step {starts.get('thorough')}; gates passed "
             f"{result['gates_passed'] or 'none'}; test acc first >= 0.5 at step {result['jump_step']}",
             f"run folder {result['config']['out']} ({result['seconds']:.0f} s; checkpoints at steps "
             + ", ".join(map(str, result["checkpoints"])) + ")"]
    return "\n".join(lines)
