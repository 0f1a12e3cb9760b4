"""Transcoders spliced in place of MLPs: the hook-level splice of one layer and the full replacement model.

A dictionary (`interplab.sae.mlp_dictionary`: per-layer transcoders or a cross-layer transcoder, CLT) computes
features f_i of layer i from x_i = `blocks.{i}.mlp.hook_in` and predicts y_l = `blocks.{l}.hook_mlp_out` from the
features of its source layers: ŷ_l = T_l(x_l) = dec_l(f_l, x_l) for a per-layer transcoder,
ŷ_l = Σ_{i ≤ l} f_i W_dec[i][:, l − i] + b_dec[l] for a CLT (a per-layer set is the CLT whose cross-layer decoders
are zero: both give the same numbers). With y_l the MLP's true output AT THE INPUT OF THE RUN BEING MADE, the outputs
spliced at `hook_mlp_out` are, per token:

    transcoder          ŷ_l
    with_errors         ŷ_l + e_l,   e_l = y_l^clean − ŷ_l^clean   the error node of the clean run, frozen
    epsilon_random      y_l + ‖y_l − ŷ_l‖ · u,   u a fresh uniform unit vector: the transcoder's error norm, isotropic
    zero_ablation       0

In the full replacement every covered layer is spliced in the same forward pass, so layer l's features are read from
an x_l that the earlier replacements changed (the errors compound). With the error terms the replacement equals the
model exactly (by induction over layers: x_i = x_i^clean for every i ≤ l, so f_i = f_i^clean and ŷ_l + e_l =
y_l^clean). ε-random at every layer perturbs each MLP
output by exactly the norm the transcoder misses at that layer's input in that run, in a random direction.

Position 0 (BOS) keeps the MLP's true output in every variant, as `sae_eval` keeps it clean: its activations are
outliers that no dictionary is trained for, and no statistic counts it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError
from interplab.evals import controls as C
from interplab.evals.eval_summary import Moments
from interplab.models.hooked import HookedModel
from interplab.sae.mlp_dictionary import IN_HOOK, OUT_HOOK, DictionarySource, as_dictionary

__all__ = ["IN_HOOK", "OUT_HOOK", "SPLICES", "CleanRun", "clean_run", "replacement_logits", "splice_output"]

SPLICES = ("transcoder", "with_errors", "epsilon_random", "zero_ablation")
"""The outputs a splice can put at `hook_mlp_out` (see the module docstring)."""


class CleanRun(NamedTuple):
    """One clean forward pass: its logits, and every covered MLP's input and output."""

    logits: Float[Tensor, "batch pos d_vocab"]
    inputs: dict[int, Float[Tensor, "batch pos d_model"]]
    outputs: dict[int, Float[Tensor, "batch pos d_model"]]


@torch.no_grad()
def clean_run(model: HookedModel, tokens: Int[Tensor, "batch pos"], layers: list[int]) -> CleanRun:
    """The model's logits, with x_l and y_l of each of `layers` read on the way."""
    names = [h.format(layer=l) for l in layers for h in (IN_HOOK, OUT_HOOK)]
    res = model.run_with_cache(tokens, names, return_logits=True)
    assert res.logits is not None
    return CleanRun(res.logits, {l: res.cache[IN_HOOK.format(layer=l)] for l in layers},
                    {l: res.cache[OUT_HOOK.format(layer=l)] for l in layers})


def splice_output(splice: str, y: Float[Tensor, "batch pos d"], y_hat: Float[Tensor, "batch pos d"], *,
                  error: Float[Tensor, "batch pos d"] | None = None, gen: torch.Generator | None = None
                  ) -> Float[Tensor, "batch pos d"]:
    """What `splice` puts at hook_mlp_out given the MLP's true output y and the transcoder's ŷ (module docstring);
    position 0 keeps y. `error` (e_l) is needed by with_errors, `gen` by epsilon_random. Returned in y's dtype."""
    if splice == "transcoder":
        new = y_hat
    elif splice == "with_errors":
        if error is None:
            raise InterplabError("the with_errors splice needs the clean run's error term")
        new = y_hat + error.float()
    elif splice == "epsilon_random":
        if gen is None:
            raise InterplabError("the epsilon_random splice needs a seeded generator")
        new = C.epsilon_random(y.float(), y_hat, gen)
    elif splice == "zero_ablation":
        new = torch.zeros_like(y_hat)
    else:
        raise InterplabError(f"unknown splice {splice!r}; valid: {', '.join(SPLICES)}")
    return torch.cat([y[:, :1], new[:, 1:].to(y.dtype)], dim=1)


@torch.no_grad()
def replacement_logits(model: HookedModel, tokens: Int[Tensor, "batch pos"],
                       layers: DictionarySource, splice: str, *,
                       clean: CleanRun | None = None, gen: torch.Generator | None = None,
                       moments: dict[int, Moments] | None = None) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of the model with `splice` at every layer the dictionary covers, in one forward pass.

    `layers`: transcoders by layer, a CLT (every layer) or a wrapped `MLPDictionary`, computed in float32 (the
    dictionary is converted in place, `MLPDictionary.float`). Each covered layer's features are computed at its MLP
    input IN THIS PASS, so ŷ_l reads the features the earlier replacements produced.
    with_errors needs `clean` (its x_l and y_l give the frozen error terms e_l). With `moments`, each layer's
    (y_l, ŷ_l) of THIS run (non-BOS tokens) is added to moments[l]: the dictionary's reconstruction at the inputs
    the replacement itself produces, where errors have compounded.
    """
    if splice not in SPLICES:
        raise InterplabError(f"unknown splice {splice!r}; valid: {', '.join(SPLICES)}")
    dic = as_dictionary(layers).float()
    errors: dict[int, Tensor] = {}
    if splice == "with_errors":
        if clean is None:
            raise InterplabError("the with_errors replacement needs the clean run")
        clean_pass = dic.new_pass()
        for l in dic.layers:
            clean_pass.read(l, clean.inputs[l])
            errors[l] = clean.outputs[l].float() - clean_pass.output(l)
    needs_dictionary = splice != "zero_ablation" or moments is not None
    this_pass = dic.new_pass()

    def read_input(layer: int) -> Callable[[Tensor, str], None]:
        def read(act: Tensor, name: str) -> None:
            if needs_dictionary:  # read here, in THIS pass: a CLT's later layers decode these features
                this_pass.read(layer, act)
        return read

    def replace_output(layer: int) -> Callable[[Tensor, str], Tensor]:
        def replace(act: Tensor, name: str) -> Tensor:
            if not needs_dictionary:
                return splice_output(splice, act, torch.zeros_like(act, dtype=torch.float32))
            y_hat = this_pass.output(layer)
            if moments is not None:
                d = act.shape[-1]
                moments[layer].add(act[:, 1:].float().reshape(-1, d), y_hat[:, 1:].reshape(-1, d))
            return splice_output(splice, act, y_hat, error=errors.get(layer), gen=gen)
        return replace

    hooks = [(IN_HOOK.format(layer=l), read_input(l)) for l in dic.layers]
    hooks += [(OUT_HOOK.format(layer=l), replace_output(l)) for l in dic.layers]
    return model.run_with_hooks(tokens, hooks)
