"""Transcoders spliced in place of MLPs: the hook-level splice of one layer and the full replacement model.

A transcoder of layer l reads x_l = `blocks.{l}.mlp.hook_in` and predicts y_l = `blocks.{l}.hook_mlp_out`. With
ŷ_l = T_l(x_l) its output and y_l the MLP's true output AT THE INPUT OF THE RUN BEING MADE, the outputs spliced at
`hook_mlp_out` are, per token:

    transcoder          ŷ_l
    with_errors         ŷ_l + e_l,   e_l = y_l^clean − T_l(x_l^clean)   the error node of the clean run, frozen
    epsilon_random      y_l + ‖y_l − ŷ_l‖ · u,   u a fresh uniform unit vector: the transcoder's error norm, isotropic
    zero_ablation       0

In the full replacement every covered layer is spliced in the same forward pass, so layer l reads an x_l that the
earlier replacements changed (the errors compound). With the error terms the replacement equals the model exactly
(by induction over layers: x_l = x_l^clean, so ŷ_l + e_l = y_l^clean). ε-random at every layer perturbs each MLP
output by exactly the norm the transcoder misses at that layer's input in that run, in a random direction.

Position 0 (BOS) keeps the MLP's true output in every variant, as `sae_eval` keeps it clean: its activations are
outliers that no dictionary is trained for, and no statistic counts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError
from interplab.evals import controls as C
from interplab.evals.eval_summary import Moments
from interplab.models.hooked import HookedModel
from interplab.sae.transcoder import Transcoder

__all__ = ["IN_HOOK", "OUT_HOOK", "SPLICES", "CleanRun", "as_layers", "check_transcoders", "clean_run",
           "replacement_logits", "splice_output"]

IN_HOOK = "blocks.{layer}.mlp.hook_in"
OUT_HOOK = "blocks.{layer}.hook_mlp_out"
SPLICES = ("transcoder", "with_errors", "epsilon_random", "zero_ablation")
"""The outputs a splice can put at `hook_mlp_out` (see the module docstring)."""



def as_layers(transcoders: object) -> dict[int, Transcoder]:
    """{layer: transcoder} from a `TranscoderSet` (anything with a `.transcoders` dict by layer), a dict by layer,
    or a single transcoder."""
    if isinstance(transcoders, Transcoder):
        return {transcoders.layer: transcoders}
    by_layer = getattr(transcoders, "transcoders", transcoders)
    if not isinstance(by_layer, Mapping) or not all(isinstance(t, Transcoder) for t in by_layer.values()):
        raise InterplabError(f"expected a Transcoder, a TranscoderSet or a dict of them by layer, got "
                             f"{type(transcoders).__name__}")
    return dict(sorted(by_layer.items()))


def check_transcoders(model: HookedModel, layers: Mapping[int, Transcoder]) -> None:
    """Raise an `InterplabError` unless each transcoder of layer l reads `blocks.{l}.mlp.hook_in` and writes
    `blocks.{l}.hook_mlp_out` of `model`, with width d_model. Before any forward pass."""
    if not layers:
        raise InterplabError("no transcoder to evaluate")
    n, d = model.info.n_layers, model.info.d_model
    for layer, tc in layers.items():
        if not 0 <= layer < n:
            raise InterplabError(f"a transcoder of layer {layer} does not fit {model.info.spec}, which has layers "
                                 f"0..{n - 1}")
        want = (IN_HOOK.format(layer=layer), OUT_HOOK.format(layer=layer))
        if (tc.in_hook, tc.out_hook) != want:
            raise InterplabError(f"the transcoder of layer {layer} maps {tc.in_hook} → {tc.out_hook}; a transcoder "
                                 f"replaces an MLP: {want[0]} → {want[1]}")
        model.check_hook_names(list(want))
        if tc.sae.cfg.d_in != d:
            raise InterplabError(f"the transcoder of layer {layer} has width {tc.sae.cfg.d_in}, {model.info.spec} "
                                 f"has d_model {d}")


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


def transcoder_output(tc: Transcoder, x_in: Float[Tensor, "... d"]) -> tuple[Tensor, Tensor]:
    """(f, ŷ) of `tc` at `x_in`, in float32 (the dictionary's arithmetic does not follow a bf16 model)."""
    x = x_in.float()
    f = tc.encode(x)
    return f, tc.decode(f, x)


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
def replacement_logits(model: HookedModel, tokens: Int[Tensor, "batch pos"], layers: Mapping[int, Transcoder],
                       splice: str, *, clean: CleanRun | None = None, gen: torch.Generator | None = None,
                       moments: dict[int, Moments] | None = None) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits of the model with `splice` at every layer of `layers` in one forward pass.

    with_errors needs `clean` (its x_l and y_l give the frozen error terms e_l). With `moments`, each layer's
    (y_l, ŷ_l) of THIS run (non-BOS tokens) is added to moments[l]: the transcoder's reconstruction at the inputs
    the replacement itself produces, where errors have compounded.
    """
    if splice not in SPLICES:
        raise InterplabError(f"unknown splice {splice!r}; valid: {', '.join(SPLICES)}")
    errors: dict[int, Tensor] = {}
    if splice == "with_errors":
        if clean is None:
            raise InterplabError("the with_errors replacement needs the clean run")
        errors = {l: clean.outputs[l].float() - transcoder_output(tc, clean.inputs[l])[1] for l, tc in layers.items()}
    x_in: dict[int, Tensor] = {}

    def read_input(layer: int) -> Callable[[Tensor, str], None]:
        def read(act: Tensor, name: str) -> None:
            x_in[layer] = act
        return read

    def replace_output(layer: int) -> Callable[[Tensor, str], Tensor]:
        def replace(act: Tensor, name: str) -> Tensor:
            if splice == "zero_ablation" and moments is None:  # no transcoder needed
                return splice_output(splice, act, torch.zeros_like(act, dtype=torch.float32))
            y_hat = transcoder_output(layers[layer], x_in[layer])[1]
            if moments is not None:
                d = act.shape[-1]
                moments[layer].add(act[:, 1:].float().reshape(-1, d), y_hat[:, 1:].reshape(-1, d))
            return splice_output(splice, act, y_hat, error=errors.get(layer), gen=gen)
        return replace

    hooks = [(IN_HOOK.format(layer=l), read_input(l)) for l in layers]
    hooks += [(OUT_HOOK.format(layer=l), replace_output(l)) for l in layers]
    return model.run_with_hooks(tokens, hooks)
