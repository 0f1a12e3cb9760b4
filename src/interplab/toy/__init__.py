"""The toy-transformer lab: tasks with the exact answer, phased evaluation, training, and circuit read-outs.

    from interplab.toy import make_task
    task = make_task("modular-addition:p=113")
    batch = task.sample(512, torch.Generator().manual_seed(0))      # TaskBatch(tokens, targets, ...)

- tasks.py: tasks with the exact answer (ov-coherent pairs, skip-trigrams, modular addition, a Python generator).
- phases.py: an evaluation schedule of named phases with start conditions (joined by `and` / `or`) and gates.
- loop.py: the one training loop of the toy transformers (also `interplab beliefs train`'s), with exact resume.
- configs.py: the commands' configs (standard library only).
- train.py: `interplab toy train`.
- toy_run.py: a toy run folder read back (`ToyRun`, `load_run`).
- readouts.py, fourier.py, figures.py: `interplab toy inspect`, the circuit read-outs (EQKE, EVOU, head ablation,
  the Fourier view of modular addition) and their figures.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["InspectToyConfig", "ToyTrainConfig"],
        "loop": ["LoopResult", "StepOutcome", "TrainResult", "train_loop"],
        "phases": ["Phase", "Schedule", "parse_condition"],
        "toy_run": ["ToyRun", "load_run"],
        "tasks": ["ModularAdditionTask", "OVCoherentTask", "SkipTrigramTask", "Task", "TaskBatch", "make_task"],
    },
)
