"""An SAE together with the model and hook it reads: one loader for every command that splices or reads an SAE.

    loaded = load_sae_and_model("saes/topk-k32", model=None, hook=None, device="cpu")
    loaded.sae, loaded.model, loaded.hook, loaded.model_spec

The SAE comes from its folder (or is passed in memory), the model from the given spec, else from the model the SAE
recorded (cfg.json "model"), else from `default_model`; the hook is the given one, else the SAE's cfg.hook_name.
Every mismatch is one `InterplabError`, raised before any forward pass: no SAE, no model, no hook, an unknown hook
(the message lists the valid ones), an attention-pattern hook (not one vector per token), a width that is not the
SAE's d_in, and, with `same_hook`, a hook other than the one the SAE was trained at.
"""

from __future__ import annotations

from typing import NamedTuple

from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.sae.base import SparseAutoencoder
from interplab.sae.files import load_sae

__all__ = ["SAEWithModel", "check_sae_at_hook", "load_sae_and_model"]


class SAEWithModel(NamedTuple):
    """An SAE, the model it reads and the hook it reads at, checked to fit together."""

    sae: SparseAutoencoder
    """The SAE, on the model's device, in eval mode (dtype as saved)."""
    model: HookedModel
    hook: str
    """The hook point the SAE reads (a per-token vector of width sae.cfg.d_in)."""
    model_spec: str
    """The model's spec as given or recorded (labels results; `model.info.spec` of a model passed in memory)."""


def check_sae_at_hook(sae: SparseAutoencoder, model: HookedModel, hook: str, *, same_hook: bool = False) -> None:
    """Raise an `InterplabError` unless `hook` is a per-token hook of `model` whose width is the SAE's d_in (and,
    with `same_hook`, the hook the SAE was trained at)."""
    model.check_hook_names([hook])  # its message lists the valid names
    width = model.hook_dim(hook)
    if width is None:
        raise InterplabError(f"cannot use an SAE at {hook}: attention patterns are not one vector per token")
    if sae.cfg.d_in != width:
        raise InterplabError(f"SAE d_in {sae.cfg.d_in} does not match the width {width} of {hook} in "
                             f"{model.info.spec}; pass the model and hook the SAE was trained on")
    if same_hook and sae.cfg.hook_name and sae.cfg.hook_name != hook:
        raise InterplabError(f"the SAE was trained at {sae.cfg.hook_name}, not at --hook {hook}")


def load_sae_and_model(sae: str, model: str | None, hook: str | None, device: str | None, *,
                       loaded_sae: SparseAutoencoder | None = None, loaded_model: HookedModel | None = None,
                       default_model: str | None = None, same_hook: bool = False) -> SAEWithModel:
    """Load (or take) the SAE in folder `sae` and its model, resolve the hook, and check they fit together.

    `model` and `hook` default to what the SAE recorded (cfg.model, cfg.hook_name); a model the SAE does not record
    falls back to `default_model`, and without one is an error. `loaded_sae` / `loaded_model`, when given, are used
    instead of loading (then `sae` / `model` only label). The model is loaded on `device` (None: cuda if available).
    """
    if loaded_sae is None:
        if not sae:
            raise InterplabError("--sae is required: the folder of a saved SAE")
        loaded_sae = load_sae(sae)
    spec = model or loaded_sae.cfg.model or (loaded_model.info.spec if loaded_model is not None else default_model)
    if loaded_model is None:
        if not spec:
            raise InterplabError(f"the SAE at {sae or '(in memory)'} records no model (cfg.json model); pass --model")
        loaded_model = load_model(spec, device=device)
    hook = hook or loaded_sae.cfg.hook_name
    if not hook:
        raise InterplabError(f"the SAE at {sae or '(in memory)'} names no hook (cfg.json hook_name); pass --hook")
    check_sae_at_hook(loaded_sae, loaded_model, hook, same_hook=same_hook)
    return SAEWithModel(loaded_sae.to(loaded_model.device).eval(), loaded_model, hook, spec or loaded_model.info.spec)
