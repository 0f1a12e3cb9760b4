"""Logit lens and tuned lens: every layer's residual stream decoded to the vocabulary, beside a context-free control.

    from interplab.lens import evaluate_lenses, train_tuned_lens
    lens = train_tuned_lens(model, train_tokens)            # one affine translator per layer (Belrose et al. 2023)
    result = evaluate_lenses(model, test_tokens, tuned=lens) # KL to the final distribution per layer

- evaluate.py: the residual stream at every layer, read out through the final norm and W_U; KL per layer.
- tuned.py: `TunedLens`, trained per layer to minimise KL to the model's own final distribution.
- run.py, figures.py, configs.py: `interplab lens` (numbers, KL curves, a prediction grid; its config).
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configs": ["LensConfig"],
        "evaluate": ["evaluate_lenses", "layer_residuals", "readout"],
        "tuned": ["TunedLens", "train_tuned_lens"],
    },
)
