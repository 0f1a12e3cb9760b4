"""The toy-transformer lab: tasks with the exact answer, phased evaluation, training, and circuit read-outs.

    from interplab.toy import make_task
    task = make_task("modular-addition:p=113")
    batch = task.sample(512, torch.Generator().manual_seed(0))      # TaskBatch(tokens, targets, ...)

- tasks.py: tasks with the exact answer (ov-coherent pairs, skip-trigrams, modular addition, a Python generator).
- phases.py: an evaluation schedule of named phases with start conditions (joined by `and` / `or`) and gates.
- train.py: `interplab toy train`.
- readouts.py, fourier.py, figures.py: `interplab toy inspect`, the circuit read-outs (EQKE, EVOU, head ablation,
  the Fourier view of modular addition) and their figures.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "phases": ["Phase", "Schedule", "parse_condition"],
        "tasks": ["ModularAdditionTask", "OVCoherentTask", "SkipTrigramTask", "Task", "TaskBatch", "make_task"],
    },
)
