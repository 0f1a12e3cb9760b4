"""A toy run folder read back: what `interplab toy train` wrote, for the read-outs (`interplab toy inspect`).

    OUT/config.json     {"kind": "toy train", "config": {...}}; config["task"] is the task spec
    OUT/model/          the final model (ToyTransformer.save)
    OUT/metrics.json    the trainer's results (jump_step, steps_trained, ...), when the run is complete
    OUT/log.jsonl       every eval and phase transition, by step
    OUT/checkpoints/step-N/   the kept checkpoints
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from interplab.errors import InterplabError
from interplab.models.toy import ToyTransformer
from interplab.runs import CONFIG, METRICS, JSONDict, read_json_object
from interplab.toy.tasks import Task, make_task

KIND = "toy train"
"""The run kind `interplab toy train` writes into config.json (the same as interplab.toy.train.KIND)."""


class ToyRun(NamedTuple):
    """A toy run folder, loaded."""

    path: Path
    config: JSONDict
    """The trainer's config (config.json's "config"; `task` is the task spec)."""
    task: Task
    """The task rebuilt from the spec."""
    model: ToyTransformer
    """The final model (OUT/model)."""
    checkpoints: list[tuple[int, Path]]
    """(step, folder) of every checkpoints/step-N/, by step."""
    log: list[JSONDict]
    """The records of log.jsonl, in order."""
    metrics: JSONDict
    """metrics.json ({} while the run is incomplete)."""


def load_run(path: str | Path, device: str | torch.device = "cpu") -> ToyRun:
    """Read a run folder: config.json (its `task` spec rebuilt with `make_task`), model/, checkpoints/, log.jsonl and
    metrics.json."""
    root = Path(path)
    if not root.is_dir():
        raise InterplabError(f"run folder {root} does not exist; pass the --out folder of `interplab toy train`")
    missing = [name for name in (CONFIG, "model/config.json") if not (root / name).is_file()]
    if missing:
        raise InterplabError(f"{root} is not a toy run folder: it lacks {', '.join(missing)} "
                             "(`interplab toy train --out DIR` writes config.json and model/)")
    saved = read_json_object(str(root / CONFIG))
    config = saved.get("config")
    if saved.get("kind") != KIND or not isinstance(config, dict):
        raise InterplabError(f"{root}/{CONFIG} is not a toy train run's config (kind {saved.get('kind')!r}; "
                             f"`interplab toy train` writes kind {KIND!r})")
    if not isinstance(config.get("task"), str):
        raise InterplabError(f"{root}/{CONFIG} has no task spec (a string under 'task')")
    task, model = make_task(config["task"]), ToyTransformer.load(root / "model", device)
    if model.cfg.d_vocab < task.d_vocab or model.cfg.n_ctx < task.n_ctx:
        raise InterplabError(f"the model in {root}/model (d_vocab {model.cfg.d_vocab}, n_ctx {model.cfg.n_ctx}) "
                             f"cannot read task {task.spec()} (d_vocab {task.d_vocab}, n_ctx {task.n_ctx})")
    checkpoints = sorted((int(d.name[5:]), d) for d in root.glob("checkpoints/step-*")
                         if d.name[5:].isdigit() and (d / "config.json").is_file())
    log_file = root / "log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()] if log_file.is_file() else []
    metrics = read_json_object(str(root / METRICS)) if (root / METRICS).is_file() else {}
    return ToyRun(root, config, task, model, checkpoints, log, metrics)
