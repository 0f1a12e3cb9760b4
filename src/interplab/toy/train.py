"""`interplab toy train`: a toy transformer trained on a task (toy/tasks.py) with phased evaluation.

Loss and accuracy count at the task's mask positions only (the read-off, the "=" token). Sampled tasks draw a fresh
batch every step, seeded by (seed, step), so a resumed run sees the batches an uninterrupted one would; modular
addition trains full-batch on its train split. AdamW (betas 0.9, 0.98), linear warmup then a constant rate.

Evaluation phases (toy/phases.py), defaults per task in TASK_DEFAULTS:
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

Run folder OUT (`interplab.runs.Run`, kind "toy train"): config.json ({"kind", "config"}: this config, task defaults
filled in, without the fields that may change on resume), log.jsonl (every eval and phase transition, with "step"),
model/ (ToyTransformer.save), metrics.json (the results; written last), checkpoints/step-N/ (`interplab.toy.loop`)
every checkpoint_every steps (only the newest periodic one is kept), at each step a phase started, and at the end.
Re-running the same config resumes from the newest checkpoint; a different config in the same OUT is an error.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from jaxtyping import Float

from interplab.errors import InterplabError
from interplab.models.load import default_device
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.runs import JSONDict, JSONValue, Run
from interplab.toy.configs import ToyTrainConfig
from interplab.toy.loop import StepOutcome, TrainResult, train_loop
from interplab.toy.phases import Phase, Schedule
from interplab.toy.tasks import ModularAdditionTask, Task, TaskBatch, make_task
from interplab.toy.toy_run import KIND

EVAL_SEED = 1 << 40
"""Seeds of the fixed evaluation samples (no training step's seed reaches it)."""
LOG = "log.jsonl"
"""The eval and phase log inside the run folder."""

LogRecord = dict[str, JSONValue]


# ---- evaluation ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def task_metrics(model: ToyTransformer, batch: TaskBatch) -> dict[str, float]:
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

    def __init__(self, model: ToyTransformer, batch: TaskBatch, clock: dict[str, int]):
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


def build_schedule(cfg: ToyTrainConfig, model: ToyTransformer, train: Measured, test: Measured,
                   last_loss: dict[str, float], log: Callable[[LogRecord], None]) -> Schedule:
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


def jump_step(log: list[LogRecord], metric: str = "test_acc", threshold: float = 0.5) -> int | None:
    """The first logged step at which thorough.<metric> >= threshold (None: never)."""
    for record in log:
        metrics = record.get("metrics")
        value = metrics.get(metric) if isinstance(metrics, dict) else None
        if record.get("event") == "eval" and isinstance(value, (int, float)) and value >= threshold:
            return int(record["step"])  # type: ignore[arg-type]
    return None


def read_log(out: str | Path) -> list[LogRecord]:
    """The records of OUT/log.jsonl, in order (none if it does not exist)."""
    path = Path(out) / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_log(out: str | Path, records: list[LogRecord]) -> None:
    """Replace OUT/log.jsonl by `records`."""
    (Path(out) / LOG).write_text("".join(json.dumps(r) + "\n" for r in records))


# ---- the run -------------------------------------------------------------------------------------------------------
def build_model(cfg: ToyTrainConfig, task: Task) -> ToyTransformer:
    """The untrained model `cfg` describes, sized for `task`."""
    toy = ToyConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.heads, d_head=cfg.d_head,
                    d_mlp=cfg.d_mlp or None, n_ctx=task.n_ctx, d_vocab=task.d_vocab, act_fn=cfg.act_fn,
                    layer_norm=cfg.layer_norm, init_std=cfg.init_std, seed=cfg.seed)
    return ToyTransformer(toy, spec=f"toy:{task.spec()}")


def training_batch(task: Task, cfg: ToyTrainConfig, step: int) -> TaskBatch:
    """The batch of step `step` (0-based): a function of (seed, step) alone, so that resuming repeats it."""
    if isinstance(task, ModularAdditionTask):
        return task.train_batch()
    return task.sample(cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))


def masked_loss(model: ToyTransformer, batch: TaskBatch) -> Float[torch.Tensor, ""]:
    """Mean cross-entropy over the mask positions."""
    return torch.nn.functional.cross_entropy(model(batch.tokens)[batch.mask], batch.targets[batch.mask])



def run_toy_train(config: ToyTrainConfig) -> TrainResult:
    """Train (or resume, or find complete) the run `config` describes; see the module docstring."""
    start = time.perf_counter()
    task = make_task(config.task)
    cfg = config.resolved()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.status != "new" and not cfg.resume:
            raise InterplabError(f"{run.out} already holds a run; pass --resume to continue it, or use a new --out")
        if run.metrics is not None:
            return TrainResult(run.out, run.metrics, int(run.metrics["steps_trained"]),  # type: ignore[arg-type]
                               time.perf_counter() - start)
        return _train(cfg, task, run, start)


def _train(cfg: ToyTrainConfig, task: Task, run: Run, start: float) -> TrainResult:
    """The training of `run_toy_train` into the open run folder `run`."""
    out = Path(run.out)
    device = torch.device(cfg.device or default_device())
    model = build_model(cfg, task).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    clock, last_loss = {"step": 0}, {"loss": 0.0}
    train_b, test_b = (TaskBatch(*(t.to(device) for t in b)) for b in eval_batches(task, cfg))
    train_m, test_m = Measured(model, train_b, clock), Measured(model, test_b, clock)

    def log(record: LogRecord) -> None:
        with (out / LOG).open("a") as f:
            f.write(json.dumps(record) + "\n")

    schedule = build_schedule(cfg, model, train_m, test_m, last_loss, log)
    loss_curve: list[list[float]] = []

    def restore(state: JSONDict) -> None:
        schedule.load_state_dict(state["schedule"])  # type: ignore[arg-type]
        last_loss["loss"] = float(state["last_loss"])  # type: ignore[arg-type]
        loss_curve[:] = state["loss_curve"]  # type: ignore[index]

    def begin(step: int) -> bool:
        # The log holds exactly what happened up to the checkpoint: drop what an interrupted run wrote after it.
        write_log(out, [r for r in read_log(out) if r["step"] <= step] if step else [])  # type: ignore[operator]
        if step == 0:
            schedule.evaluate(0)
        return schedule.stop_reason is not None

    def after_step(step: int, loss: float) -> StepOutcome:
        clock["step"], last_loss["loss"] = step, loss
        postfix = None
        if step % cfg.qualify_every == 0:
            loss_curve.append([step, loss])
            postfix = {k: f"{v:.3g}" for m in schedule.latest.values() for k, v in m.items()}
        stopped = schedule.evaluate(step, last=step == cfg.steps)
        started_now = any(s.started == step for s in schedule.states.values())
        return StepOutcome(stop=stopped, checkpoint=started_now, postfix=postfix)

    def learning_rate(step: int) -> float:
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))

    def batch_loss(step: int) -> torch.Tensor:
        return masked_loss(model, TaskBatch(*(t.to(device) for t in training_batch(task, cfg, step))))

    assert cfg.steps is not None and cfg.lr is not None
    done = train_loop(model, optimizer, out, steps=cfg.steps, learning_rate=learning_rate, batch_loss=batch_loss,
                      after_step=after_step, begin=begin, restore=restore, checkpoint_every=cfg.checkpoint_every,
                      state=lambda: {"schedule": schedule.state_dict(), "last_loss": last_loss["loss"],
                                     "loss_curve": loss_curve},  # type: ignore[dict-item]
                      progress=cfg.progress, desc=f"toy {task.name}")
    model.save(out / "model")
    final = {"train_" + k: v for k, v in task_metrics(model, train_b).items()}
    final |= {"test_" + k: v for k, v in task_metrics(model, test_b).items()}
    run.write_metrics({
        "task": task.spec(), "steps_trained": done.steps,
        "status": "aborted" if (schedule.stop_reason or "").startswith("aborted") else
                  "stopped early" if schedule.stop_reason else "completed",
        "stop_reason": schedule.stop_reason, "final": final,
        "phase_starts": {n: s.started for n, s in schedule.states.items()},
        "gates_passed": {n: s.ended for n, s in schedule.states.items() if s.ended is not None},
        "jump_step": jump_step(read_log(out)), "jump_definition": "first logged step with thorough.test_acc >= 0.5",
        "checkpoints": done.checkpoints, "loss_curve": loss_curve,  # type: ignore[dict-item]
        "train_seconds": done.seconds,
    })
    assert run.metrics is not None
    return TrainResult(run.out, run.metrics, done.resumed_from, time.perf_counter() - start)


def format_summary(result: TrainResult) -> str:
    """A few lines: status, final accuracies and losses, phase starts and gates, where the run is."""
    m = result.metrics
    f, starts = m["final"], m["phase_starts"]
    assert isinstance(f, dict) and isinstance(starts, dict) and isinstance(m["checkpoints"], list)
    lines = [f"task {m['task']}: {m['status']} after {m['steps_trained']} steps"
             + (f" ({m['stop_reason']})" if m["stop_reason"] else "")
             + (f", resumed at step {result.resumed_from}" if result.resumed_from else ""),
             f"train acc {f['train_acc']:.4f} loss {f['train_loss']:.4f}   test acc {f['test_acc']:.4f} "
             f"loss {f['test_loss']:.4f}   worst output acc {f['test_worst_output_acc']:.4f}",
             f"thorough phase started at step {starts.get('thorough')}; gates passed "
             f"{m['gates_passed'] or 'none'}; test acc first >= 0.5 at step {m['jump_step']}",
             f"run folder {result.out} ({result.seconds:.0f} s; checkpoints at steps "
             + ", ".join(map(str, m["checkpoints"])) + ")"]
    return "\n".join(lines)
