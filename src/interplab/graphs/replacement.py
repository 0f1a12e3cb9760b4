"""The local replacement model of one prompt: every MLP replaced by its transcoder plus an error term.

For a prompt, at layer l and position p,

    mlp_out[l, p] = Σ_f a[l, p, f] · W_dec[l, f]  +  b_dec[l]  (+ x_in[l, p] @ W_skip[l])  +  err[l, p],

where a = the transcoder's activations on the MLP's real input x_in = `blocks.{l}.mlp.hook_in` and err (the error
node) is whatever the transcoder misses, so the sum is the real MLP output exactly. With the attention patterns and
the norms' scales frozen at their values on this prompt, and the activations a and errors held fixed, everything
between the residual stream and a transcoder's pre-activations or the logits is linear (Ameisen et al. 2025,
"Circuit Tracing"; the open `circuit-tracer` package does the same). `setup_replacement` reads what the graph's nodes
need from one clean forward pass; `replacement_logits` runs the replacement model itself (no errors: how far the
transcoders alone get).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.hooks import HookFn
from interplab.sae.transcoder import Transcoder

Transcoders = Mapping[int, Transcoder]
"""One transcoder per layer, by layer (`TranscoderSet.transcoders`)."""


class Replacement(NamedTuple):
    """What an attribution graph's nodes are, read from one clean forward pass of the prompt."""

    tokens: Int[torch.Tensor, "1 pos"]
    logits: Float[torch.Tensor, " d_vocab"]
    """The real model's logits at the last position."""
    feat_layer: Int[torch.Tensor, " n_feat"]
    """Active features, sorted by layer then position then index: their layer,"""
    feat_pos: Int[torch.Tensor, " n_feat"]
    """position,"""
    feat_index: Int[torch.Tensor, " n_feat"]
    """latent index,"""
    feat_act: Float[torch.Tensor, " n_feat"]
    """and activation a."""
    encoder_rows: Float[torch.Tensor, "n_feat d_model"]
    """W_enc[:, f]: the gradient of the feature's pre-activation with respect to the MLP input."""
    decoder_vecs: Float[torch.Tensor, "n_feat d_model"]
    """a · W_dec[f]: what the feature writes into the MLP output."""
    errors: Float[torch.Tensor, "n_layers pos d_model"]
    """mlp_out − transcoder output (zero at a dropped BOS position)."""
    embeddings: Float[torch.Tensor, "pos d_model"]
    """The token embeddings (`hook_embed`)."""
    mlp_out: Float[torch.Tensor, "n_layers pos d_model"]
    """The real MLP outputs."""


def check_transcoders(model: HookedModel, transcoders: Transcoders) -> None:
    """One-line InterplabError unless there is one transcoder per layer reading `blocks.{l}.mlp.hook_in` and writing
    `blocks.{l}.hook_mlp_out`, of width d_model."""
    n_layers, d_model = model.info.n_layers, model.info.d_model
    if sorted(transcoders) != list(range(n_layers)):
        raise InterplabError(f"need one transcoder per layer 0..{n_layers - 1} of {model.info.spec}, "
                             f"got layers {sorted(transcoders)}")
    for layer, tc in transcoders.items():
        want = (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out")
        if (tc.in_hook, tc.out_hook) != want:
            raise InterplabError(f"transcoder {layer} reads {tc.in_hook!r} and writes {tc.out_hook!r}; a graph needs "
                                 f"the MLP's input and output {want[0]!r} → {want[1]!r}")
        if tc.sae.cfg.d_in != d_model:
            raise InterplabError(f"transcoder {layer} has width {tc.sae.cfg.d_in}, the model's d_model is {d_model}")


def freeze_hooks(model: HookedModel, cache: Mapping[str, torch.Tensor] | None = None) -> list[tuple[str, HookFn]]:
    """Hooks that freeze every attention pattern and norm scale: to `cache[name]` if given (values of another
    run), else to the run's own values with the gradient stopped (the linearisation of the replacement model)."""
    names = frozen_names(model)
    if cache is None:
        return [(name, lambda act, _name: act.detach()) for name in names]
    return [(name, lambda act, n: cache[n].to(act).expand_as(act)) for name in names]


def frozen_names(model: HookedModel) -> list[str]:
    """The hook points `freeze_hooks` freezes: attention patterns and norm scales."""
    return [n for n in model.hook_names if n.endswith(("attn.hook_pattern", "hook_scale"))]


def mlp_hooks(n_layers: int) -> list[str]:
    return [f"blocks.{l}.mlp.hook_in" for l in range(n_layers)] + [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]


def starts_with_special(model: HookedModel, tokens: Int[torch.Tensor, "1 pos"]) -> bool:
    """Whether position 0 holds a special token (BOS and the like) of the model's tokenizer."""
    tok = model.tokenizer
    first = int(tokens[0, 0])
    special = set(getattr(tok, "all_special_ids", []) or [])
    bos = getattr(tok, "bos_token_id", None)
    return first in special or (bos is not None and first == bos)


@torch.no_grad()
def setup_replacement(model: HookedModel, transcoders: Transcoders, tokens: Int[torch.Tensor, "1 pos"], *,
                      zero_bos: bool = True) -> Replacement:
    """Run the prompt once; read the active features, error vectors, embeddings and last-position logits.

    With `zero_bos` and a special token at position 0, that position gets no feature nodes and a zero error
    vector (circuit-tracer's convention): its MLP outputs stay in the model, as constants no node carries.
    """
    check_transcoders(model, transcoders)
    tokens = model.check_tokens(tokens)
    if tokens.shape[0] != 1:
        raise InterplabError(f"an attribution graph is of one prompt, got a batch of {tokens.shape[0]}")
    n_layers = model.info.n_layers
    res = model.run_with_cache(tokens, ["hook_embed", *mlp_hooks(n_layers)], return_logits=True)
    cache, logits = res.cache, res.logits
    assert logits is not None
    drop_first = zero_bos and starts_with_special(model, tokens)
    feats: list[tuple[torch.Tensor, ...]] = []
    errors, outs = [], []
    for layer in range(n_layers):
        tc = transcoders[layer]
        x_in, out = cache[f"blocks.{layer}.mlp.hook_in"][0], cache[f"blocks.{layer}.hook_mlp_out"][0]
        x_in = x_in.to(tc.device, tc.sae.W_enc.dtype)
        acts = tc.encode(x_in)  # [pos, d_sae]
        err = out.to(acts) - tc.decode(acts, x_in)
        if drop_first:
            acts[0], err[0] = 0, 0
        pos, idx = acts.nonzero(as_tuple=True)  # row-major: sorted by position, then index
        vals = acts[pos, idx]
        feats.append((torch.full_like(pos, layer), pos, idx, vals, tc.sae.W_enc[:, idx].T,
                      vals[:, None] * tc.sae.W_dec[idx]))
        errors.append(err)
        outs.append(out.to(acts))
    cols = [torch.cat(c) for c in zip(*feats)]
    return Replacement(tokens, logits[0, -1], *cols, torch.stack(errors), cache["hook_embed"][0].to(cols[3]),
                       torch.stack(outs))


@torch.no_grad()
def replacement_logits(model: HookedModel, transcoders: Transcoders, tokens: Int[torch.Tensor, "batch pos"], *,
                       with_errors: bool = False) -> Float[torch.Tensor, "batch pos d_vocab"]:
    """Logits of the local replacement model: attention patterns and norm scales frozen at the real run's values,
    each MLP output replaced by its transcoder's output on the (replacement model's own) MLP input, plus the real
    run's error term if `with_errors` (which gives the real logits back: the check that the errors are complete)."""
    check_transcoders(model, transcoders)
    tokens = model.check_tokens(tokens)
    n_layers = model.info.n_layers
    names = frozen_names(model) + [f"blocks.{l}.mlp.hook_in" for l in range(n_layers)]
    names += [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]
    clean = model.run_with_cache(tokens, names).cache
    inputs: dict[int, torch.Tensor] = {}

    def read_in(act: torch.Tensor, name: str) -> None:
        inputs[int(name.split(".")[1])] = act

    def replace_out(act: torch.Tensor, name: str) -> torch.Tensor:
        layer = int(name.split(".")[1])
        tc = transcoders[layer]
        x_in = inputs[layer].to(tc.device, tc.sae.W_enc.dtype)
        out = tc(x_in)
        if with_errors:
            x_clean = clean[f"blocks.{layer}.mlp.hook_in"].to(x_in)
            out = out + clean[name].to(out) - tc(x_clean)
        return out.to(act)

    hooks = freeze_hooks(model, {n: clean[n] for n in frozen_names(model)})
    hooks += [(f"blocks.{l}.mlp.hook_in", read_in) for l in range(n_layers)]
    hooks += [(f"blocks.{l}.hook_mlp_out", replace_out) for l in range(n_layers)]
    return model.run_with_hooks(tokens, hooks)
