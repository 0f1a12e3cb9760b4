"""Causal interventions: which components cause a behaviour.

    from interplab.circuits import load_pairs, activation_patch, attribution_patch, direct_logit_attribution
    batch = load_pairs(model, "ioi", n=16, seed=0)        # clean/corrupted/null prompts, answer and wrong tokens
    effects = activation_patch(model, runs, sweep_grids(model.info, "heads", n_pos), metric)

- prompts.py: built-in prompt pairs (IOI, induction, factual) and JSONL pairs.
- metrics.py: logit difference, probability, KL; normalisation (0 = corrupted, 1 = clean).
- nodes.py: what a sweep patches (a hook sliced by position and head) and where each effect goes.
- patching.py: activation patching with the prefix reused; path.py: path patching to heads' q/k/v or the logits.
- attribution.py: attribution patching (AtP, AtP*); agreement.py: how it compares with activation patching.
- effects.py: mean, SEM and the null control of every effect.
- dla.py: direct logit attribution through the frozen final norm.
- detectors.py: previous-token, duplicate-token, induction and copying heads, beside controls.
- run_patch.py, run_dla.py, run_heads.py, summary.py, figures.py, configs.py: the commands `patch`, `dla`, `heads`.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["DLAConfig", "HeadsConfig", "PatchConfig"],
        "prompts": ["PairBatch", "load_pairs"],
        "metrics": ["make_metric", "normalise"],
        "nodes": ["Grid", "Node", "sweep_grids"],
        "patching": ["Runs", "activation_patch", "direction_runs"],
        "path": ["path_patch"],
        "attribution": ["attribution_patch"],
        "dla": ["direct_logit_attribution"],
    },
)
