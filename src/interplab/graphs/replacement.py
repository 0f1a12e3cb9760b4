"""The local replacement model of one prompt: every MLP replaced by its dictionary's reconstruction plus an error term.

For a prompt, at layer j and position p,

    mlp_out[j, p] = Σ_{i ≤ j} Σ_f a[i, p, f] · W_dec[i][f, j − i] + b_dec[j] (+ x_in[j, p] @ W_skip[j]) + err[j, p],

where a[i] = the activations of layer i's features on that layer's real MLP input x_in = `blocks.{i}.mlp.hook_in`
(per-layer transcoders: only i = j, a skip term possibly; a cross-layer transcoder: every i ≤ j; sae/mlp_dictionary.py)
and err (the error node) is whatever the dictionary misses, so the sum is the real MLP output exactly. With the
attention patterns and the norms' scales frozen at their values on this prompt, and the activations a and errors
held fixed, everything between the residual stream and a feature's pre-activation or the logits is linear (Ameisen
et al. 2025, "Circuit Tracing"; the open `circuit-tracer` package does the same). `setup_replacement` reads what the
graph's nodes need from one clean forward pass; `replacement_logits` runs the replacement model itself (no errors:
how far the dictionary alone gets).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.hooks import HookFn
from interplab.sae.mlp_dictionary import (
    Dictionary,
    MLPDictionary,
    Transcoders,
    as_dictionary,
    check_transcoders,
    mlp_in,
    mlp_out,
)

__all__ = ["Dictionary", "Replacement", "Transcoders", "check_transcoders", "replacement_logits", "setup_replacement"]


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
    decoder_vecs: Float[torch.Tensor, "n_dec d_model"]
    """a · W_dec[f] (into layer j: a · W_dec[i][f, j − i] for a CLT): what a feature writes into one MLP output,
    one row per (feature, output layer), sorted by output layer, then position, then feature. For per-layer
    transcoders row k is feature k's."""
    dec_feature: Int[torch.Tensor, " n_dec"]
    """The feature (index into the feat_* lists) of each decoder row,"""
    dec_layer: Int[torch.Tensor, " n_dec"]
    """and the MLP output it writes into."""
    errors: Float[torch.Tensor, "n_layers pos d_model"]
    """mlp_out − the dictionary's reconstruction (zero at a dropped BOS position)."""
    embeddings: Float[torch.Tensor, "pos d_model"]
    """The token embeddings (`hook_embed`)."""
    mlp_out: Float[torch.Tensor, "n_layers pos d_model"]
    """The real MLP outputs."""


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
    return [mlp_in(l) for l in range(n_layers)] + [mlp_out(l) for l in range(n_layers)]


def starts_with_special(model: HookedModel, tokens: Int[torch.Tensor, "1 pos"]) -> bool:
    """Whether position 0 holds a special token (BOS and the like) of the model's tokenizer."""
    tok = model.tokenizer
    first = int(tokens[0, 0])
    special = set(getattr(tok, "all_special_ids", []) or [])
    bos = getattr(tok, "bos_token_id", None)
    return first in special or (bos is not None and first == bos)


@torch.no_grad()
def setup_replacement(model: HookedModel, transcoders: Dictionary, tokens: Int[torch.Tensor, "1 pos"], *,
                      zero_bos: bool = True) -> Replacement:
    """Run the prompt once; read the active features, their decoder rows, the error vectors, embeddings and the
    last-position logits.

    With `zero_bos` and a special token at position 0, that position gets no feature nodes and a zero error
    vector (circuit-tracer's convention): its MLP outputs stay in the model, as constants no node carries.
    """
    dic = as_dictionary(transcoders)
    dic.check(model)
    tokens = model.check_tokens(tokens)
    if tokens.shape[0] != 1:
        raise InterplabError(f"an attribution graph is of one prompt, got a batch of {tokens.shape[0]}")
    n_layers = model.info.n_layers
    res = model.run_with_cache(tokens, ["hook_embed", *mlp_hooks(n_layers)], return_logits=True)
    cache, logits = res.cache, res.logits
    assert logits is not None
    x_ins = [cache[mlp_in(l)][0].to(dic.device, dic.dtype) for l in range(n_layers)]
    outs = torch.stack([cache[mlp_out(l)][0].to(dic.device, dic.dtype) for l in range(n_layers)])
    acts = {l: dic.encode(l, x_ins[l]) for l in range(n_layers)}  # [pos, d_sae] each
    errors = torch.stack([outs[l] - dic.output(l, acts, x_ins[l]) for l in range(n_layers)])
    if zero_bos and starts_with_special(model, tokens):
        errors[:, 0] = 0
        for a in acts.values():
            a[0] = 0
    feats = [_layer_features(dic, layer, acts[layer]) for layer in range(n_layers)]
    layer, pos, idx, vals, enc = (torch.cat(c) for c in zip(*[f[:5] for f in feats]))
    dec_vecs, dec_feat, dec_layer = _decoder_rows(dic, feats, pos, n_pos=tokens.shape[1])
    return Replacement(tokens, logits[0, -1], layer, pos, idx, vals, enc, dec_vecs, dec_feat, dec_layer, errors,
                       cache["hook_embed"][0].to(vals), outs)


def _layer_features(dic: MLPDictionary, layer: int, acts: Float[torch.Tensor, "pos d_sae"]
                    ) -> tuple[torch.Tensor, ...]:
    """The active features of one layer: layer, position, index, activation, encoder rows, scaled decoder rows
    [n, n_out, d_model] (sorted by position, then index: `nonzero` is row-major)."""
    pos, idx = acts.nonzero(as_tuple=True)
    vals = acts[pos, idx]
    return (torch.full_like(pos, layer), pos, idx, vals, dic.encoder_rows(layer, idx),
            vals[:, None, None] * dic.decoder_rows(layer, idx))


def _decoder_rows(dic: MLPDictionary, feats: list[tuple[torch.Tensor, ...]], feat_pos: Int[torch.Tensor, " n"],
                  n_pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (feature, output layer) decoder row, sorted by output layer, then position, then feature."""
    vecs, owner, out_layer, start = [], [], [], 0
    for layer, f in enumerate(feats):
        dec = f[5]  # [n, n_out, d]
        n, n_out = dec.shape[0], dec.shape[1]
        vecs.append(dec.reshape(n * n_out, -1))
        owner.append((torch.arange(n, device=dec.device) + start).repeat_interleave(n_out))
        out_layer.append(torch.arange(layer, layer + n_out, device=dec.device).repeat(n))
        start += n
    vec, own, lay = torch.cat(vecs), torch.cat(owner), torch.cat(out_layer)
    order = (lay * n_pos + feat_pos[own]).argsort(stable=True)  # stable: features stay in order within (j, pos)
    return vec[order], own[order], lay[order]


@torch.no_grad()
def replacement_logits(model: HookedModel, transcoders: Dictionary, tokens: Int[torch.Tensor, "batch pos"], *,
                       with_errors: bool = False) -> Float[torch.Tensor, "batch pos d_vocab"]:
    """Logits of the local replacement model: attention patterns and norm scales frozen at the real run's values,
    each MLP output replaced by the dictionary's reconstruction from the (replacement model's own) MLP inputs, plus
    the real run's error term if `with_errors` (which gives the real logits back: the check that the errors are
    complete)."""
    dic = as_dictionary(transcoders)
    dic.check(model)
    tokens = model.check_tokens(tokens)
    n_layers = model.info.n_layers
    clean = model.run_with_cache(tokens, frozen_names(model) + mlp_hooks(n_layers)).cache
    clean_in = {l: clean[mlp_in(l)].to(dic.device, dic.dtype) for l in range(n_layers)}
    clean_acts = {l: dic.encode(l, x) for l, x in clean_in.items()}
    inputs: dict[int, torch.Tensor] = {}
    acts: dict[int, torch.Tensor] = {}

    def read_in(act: torch.Tensor, name: str) -> None:
        layer = int(name.split(".")[1])
        inputs[layer] = act.to(dic.device, dic.dtype)
        acts[layer] = dic.encode(layer, inputs[layer])

    def replace_out(act: torch.Tensor, name: str) -> torch.Tensor:
        layer = int(name.split(".")[1])
        out = dic.output(layer, acts, inputs[layer])
        if with_errors:
            out = out + clean[name].to(out) - dic.output(layer, clean_acts, clean_in[layer])
        return out.to(act)

    hooks = freeze_hooks(model, {n: clean[n] for n in frozen_names(model)})
    hooks += [(mlp_in(l), read_in) for l in range(n_layers)]
    hooks += [(mlp_out(l), replace_out) for l in range(n_layers)]
    return model.run_with_hooks(tokens, hooks)
