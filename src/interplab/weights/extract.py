"""Any model's weights in one layout (TransformerLens: activations are rows, `x @ W`), with the norms folded in.

Every reader of weights (QK/OV circuits, SVD readings, lenses) goes through this module, so that it never needs to
know how a given architecture stores its matrices.

Layout (h = head, d = d_model, e = d_head, m = d_mlp, V = d_vocab):
    W_Q, W_K, W_V [h, d, e], b_Q, b_K, b_V [h, e]    q_h = x W_Q[h] + b_Q[h]
    W_O [h, e, d], b_O [d]                            attn_out = Σ_h z_h W_O[h] + b_O
    W_in, W_gate [d, m], b_in [m]                     MLP(x) = act(x W_in + b_in) W_out + b_out, or, gated (llama),
    W_out [m, d], b_out [d]                           MLP(x) = (act(x W_gate) ⊙ (x W_in + b_in)) W_out + b_out
    W_E [V, d], W_pos [n_ctx, d], W_U [d, V], b_U [V] logits = x W_U + b_U
Grouped-query attention (fewer K/V heads than Q heads) is expanded: query head h reads K/V head h // (h_q / h_kv),
so every query head has its own W_K[h], W_V[h] (copies of the shared ones). Missing biases are zeros.

Norm folding (`fold_norm=True`). Each block reads the residual stream x through a norm:
    LayerNorm(x) = γ ⊙ x̂ + β,   x̂ = (x − mean(x)) / sqrt(var(x) + ε)
    RMSNorm(x)   = γ ⊙ x̂,       x̂ = x / sqrt(mean(x²) + ε)
and a matrix W (bias b) reads the norm's output, so LN(x) W + b = x̂ (diag(γ) W) + (β W + b). Folding returns
    W' = diag(γ) W,   b' = b + β W
for every matrix that reads a norm: W_Q, W_K, W_V from the attention norm, W_in and W_gate from the MLP norm (W_gate
has no bias, and β = 0 for RMSNorm, so W_gate folds exactly), W_U from the final norm. The folded matrices act on
the *un-scaled* normalised stream x̂ (see `normalize`): e.g. q_h = x̂ W_Q'[h] + b_Q'[h] exactly. Matrices that
write to the stream (W_O, W_out, W_E, W_pos) are not read through a norm and are unchanged.

What folding does not capture:
- the division: x̂ depends on x non-linearly (each token is rescaled by its own norm), so a folded matrix is a
  linear map of x̂, not of x. For LayerNorm x̂ is also centred (x̂ ⊥ 1), so the component of each column of W'
  along the all-ones direction is never read.
- rotary position embeddings (llama family, gpt_neox; `rotary=True`): q and k are rotated by their positions
  before the dot product, q R(p_k − p_q) kᵀ, so W_Q W_Kᵀ is the QK circuit at relative offset 0 only (a token
  attending to its own position); gpt_neox rotates only a fraction of each head's dims (partial_rotary_factor), the rest
  are position-free.
- the attention scale (1/sqrt(d_head), and GPT-2's optional 1/(layer+1)) is not folded into W_Q.
- Qwen3 normalises each head's q and k (RMSNorm over d_head, after the projection): with folding its scale is
  folded into W_Q, W_K (and b_Q, b_K) as well, so q_h = x̂ W_Q'[h] + b_Q'[h] equals Qwen3's query up to the
  per-head division 1/rms(x̂ W_Q[h] + b_Q[h]); the QK circuit is then exact up to a positive factor per
  (query, key) pair. Without folding W_Q, W_K are the raw projections.
- with a parallel residual (gpt_neox default) the MLP's norm reads the block's input, not resid_mid.

All tensors are detached float32 copies on the model's device (never views of its parameters).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import nn

from interplab.errors import InterplabError
from interplab.models.hf import ARCHS, HFHookedModel
from interplab.models.hooked import HookedModel
from interplab.models.toy import ToyTransformer

_LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED = "the interplab toy transformer and HF models of type " + ", ".join(sorted(ARCHS))
# Per HF family: the norm before attention and the norm before the MLP, from a block.
_BLOCK_NORMS = {"llama": ("input_layernorm", "post_attention_layernorm"), "gpt2": ("ln_1", "ln_2"),
                "gpt_neox": ("input_layernorm", "post_attention_layernorm")}


class AttentionWeights(NamedTuple):
    W_Q: Float[torch.Tensor, "head d_model d_head"]
    W_K: Float[torch.Tensor, "head d_model d_head"]
    """With grouped-query attention, K/V heads are repeated: query head h uses K/V head h // (n_heads // n_kv)."""
    W_V: Float[torch.Tensor, "head d_model d_head"]
    W_O: Float[torch.Tensor, "head d_head d_model"]
    b_Q: Float[torch.Tensor, "head d_head"]
    b_K: Float[torch.Tensor, "head d_head"]
    b_V: Float[torch.Tensor, "head d_head"]
    b_O: Float[torch.Tensor, " d_model"]
    rotary: bool
    """True when q and k are rotated by position (llama, neox): W_Q W_Kᵀ is then the relative-offset-0 circuit."""


class MLPWeights(NamedTuple):
    W_in: Float[torch.Tensor, "d_model d_mlp"]
    """The MLP's input projection (llama: up_proj, the linear branch of the gated product)."""
    b_in: Float[torch.Tensor, " d_mlp"]
    W_gate: Float[torch.Tensor, "d_model d_mlp"] | None
    """llama: gate_proj, with act(x W_gate) ⊙ (x W_in); None for ungated MLPs."""
    W_out: Float[torch.Tensor, "d_mlp d_model"]
    b_out: Float[torch.Tensor, " d_model"]
    act_fn: str
    """The nonlinearity as the config names it (silu, gelu_new, gelu, ...)."""


# ---- public API -----------------------------------------------------------------------------------------------
def embedding(model: HookedModel) -> Float[torch.Tensor, "d_vocab d_model"]:
    """W_E: row t is what token t adds to the residual stream."""
    if isinstance(model, ToyTransformer):
        if type(model)._embed is not ToyTransformer._embed:
            raise InterplabError(f"{model.info.spec} ({model.info.arch}) does not embed tokens through W_E "
                                 "(its _embed reads something else), so it has no token embedding matrix")
        return _copy(model.W_E)
    return _copy(_hf(model).model.get_input_embeddings().weight)


def positional_embedding(model: HookedModel) -> Float[torch.Tensor, "n_ctx d_model"] | None:
    """W_pos (learned absolute positions: toy, gpt2); None for models without one (rotary models)."""
    if isinstance(model, ToyTransformer):
        return _copy(model.W_pos)
    hf = _hf(model)
    return None if hf.arch.pos_embed is None else _copy(hf.model.get_submodule(hf.arch.pos_embed).weight)


def unembedding(
    model: HookedModel, fold_norm: bool = True
) -> tuple[Float[torch.Tensor, "d_model d_vocab"], Float[torch.Tensor, " d_vocab"]]:
    """(W_U, b_U) with logits = ln_final(x) W_U + b_U; folded, logits = x̂ W_U' + b_U' (x̂ = `normalize(model, x)`)."""
    if isinstance(model, ToyTransformer):
        W_U, b_U, norm = _copy(model.W_U), _copy(model.b_U), model.ln_final
    else:
        hf = _hf(model)
        head = hf.model.get_output_embeddings()
        W_U = _copy(head.weight).T.contiguous()
        b_U = _copy(head.bias) if getattr(head, "bias", None) is not None else W_U.new_zeros(W_U.shape[1])
        norm = hf.model.get_submodule(hf.arch.final_norm)
    return _fold(W_U, b_U, norm) if fold_norm else (W_U, b_U)


def attention_weights(model: HookedModel, layer: int, fold_norm: bool = True) -> AttentionWeights:
    """The attention weights of block `layer`, folded with the norm before attention unless `fold_norm=False`."""
    _check_layer(model, layer)
    if isinstance(model, ToyTransformer):
        attn, norm = model.blocks[layer].attn, model.blocks[layer].ln1
        raw = AttentionWeights(*(_copy(getattr(attn, n)) for n in AttentionWeights._fields[:-1]), rotary=False)
    else:
        hf = _hf(model)
        family, block = _family(hf), hf.blocks[layer]
        norm = block.get_submodule(_BLOCK_NORMS[family][0])
        raw = _HF_ATTENTION[family](hf, block.get_submodule(hf.arch.attn))
    if not fold_norm:
        return raw
    (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = (_fold(W, b, norm) for W, b in
                                          ((raw.W_Q, raw.b_Q), (raw.W_K, raw.b_K), (raw.W_V, raw.b_V)))
    if isinstance(model, HFHookedModel) and hasattr(attn_module := _hf_attn(model, layer), "q_norm"):
        gamma_q, gamma_k = _gamma(attn_module.q_norm), _gamma(attn_module.k_norm)  # Qwen3: per-head RMSNorm on q, k
        W_Q, b_Q, W_K, b_K = W_Q * gamma_q, b_Q * gamma_q, W_K * gamma_k, b_K * gamma_k
    return raw._replace(W_Q=W_Q, b_Q=b_Q, W_K=W_K, b_K=b_K, W_V=W_V, b_V=b_V)


def mlp_weights(model: HookedModel, layer: int, fold_norm: bool = True) -> MLPWeights:
    """The MLP weights of block `layer`, folded with the norm before the MLP unless `fold_norm=False`."""
    _check_layer(model, layer)
    if isinstance(model, ToyTransformer):
        block = model.blocks[layer]
        if not block.has_mlp:
            raise InterplabError(f"{model.info.spec} is attention-only (d_mlp is None): block {layer} has no MLP")
        mlp, norm = block.mlp, block.ln2
        raw = MLPWeights(_copy(mlp.W_in), _copy(mlp.b_in), None, _copy(mlp.W_out), _copy(mlp.b_out),
                         model.cfg.act_fn)
    else:
        hf = _hf(model)
        family, block = _family(hf), hf.blocks[layer]
        norm = block.get_submodule(_BLOCK_NORMS[family][1])
        raw = _HF_MLP[family](hf, block.get_submodule(hf.arch.mlp))
    if not fold_norm:
        return raw
    W_in, b_in = _fold(raw.W_in, raw.b_in, norm)
    W_gate = None if raw.W_gate is None else _fold(raw.W_gate, raw.W_gate.new_zeros(raw.W_gate.shape[1]), norm)[0]
    return raw._replace(W_in=W_in, b_in=b_in, W_gate=W_gate)


def normalize(model: HookedModel, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
    """x̂: the residual stream normalised like the model's norms but without their scale γ and shift β — the stream
    the folded matrices read. (Every norm of a model is of the same kind; ε is the final norm's.)"""
    norm = model.ln_final if isinstance(model, ToyTransformer) else \
        _hf(model).model.get_submodule(_hf(model).arch.final_norm)
    kind, eps = _norm_kind(norm)
    x = resid.float()
    if kind == "none":
        return x
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---- HF layouts -----------------------------------------------------------------------------------------------
def _llama_attention(hf: HFHookedModel, attn: nn.Module) -> AttentionWeights:
    """q/k/v_proj: nn.Linear, weight [heads·d_head, d_model] (rows grouped by head); o_proj [d_model, heads·d_head]."""
    n_heads, d_head = hf.info.n_heads, hf.info.d_head
    W_Q, b_Q = _linear_heads(attn.q_proj, d_head)
    W_K, b_K = _linear_heads(attn.k_proj, d_head)
    W_V, b_V = _linear_heads(attn.v_proj, d_head)
    if W_K.shape[0] != n_heads:  # grouped-query attention: repeat_interleave matches HF's repeat_kv
        if n_heads % W_K.shape[0]:
            raise InterplabError(f"{n_heads} query heads are not a multiple of {W_K.shape[0]} key/value heads")
        rep = n_heads // W_K.shape[0]
        W_K, b_K, W_V, b_V = (t.repeat_interleave(rep, dim=0) for t in (W_K, b_K, W_V, b_V))
    W_O = _copy(attn.o_proj.weight).T.reshape(n_heads, d_head, -1)
    return AttentionWeights(W_Q, W_K, W_V, W_O, b_Q, b_K, b_V, _bias(attn.o_proj, W_O.shape[-1], W_O), rotary=True)


def _gpt2_attention(hf: HFHookedModel, attn: nn.Module) -> AttentionWeights:
    """c_attn: Conv1D (y = x W + b), W [d_model, 3·d_model] = [q | k | v], each d_model wide and grouped by head."""
    n_heads, d_head, d_model = hf.info.n_heads, hf.info.d_head, hf.info.d_model
    W = _copy(attn.c_attn.weight).reshape(d_model, 3, n_heads, d_head).permute(1, 2, 0, 3)  # [3 head d_model e]
    b = _copy(attn.c_attn.bias).reshape(3, n_heads, d_head)
    W_O = _copy(attn.c_proj.weight).reshape(n_heads, d_head, d_model)
    return AttentionWeights(W[0], W[1], W[2], W_O, b[0], b[1], b[2], _copy(attn.c_proj.bias), rotary=False)


def _neox_attention(hf: HFHookedModel, attn: nn.Module) -> AttentionWeights:
    """query_key_value: nn.Linear, weight rows laid out [head, (q, k, v), d_head] (HF views the output as
    [head, 3·d_head] and chunks it into q, k, v); dense [d_model, heads·d_head]."""
    n_heads, d_head, d_model = hf.info.n_heads, hf.info.d_head, hf.info.d_model
    qkv = attn.query_key_value
    W = _copy(qkv.weight).reshape(n_heads, 3, d_head, d_model).permute(1, 0, 3, 2)  # [3 head d_model e]
    b = _copy(qkv.bias).reshape(n_heads, 3, d_head).transpose(0, 1) if qkv.bias is not None else \
        W.new_zeros(3, n_heads, d_head)
    W_O = _copy(attn.dense.weight).T.reshape(n_heads, d_head, d_model)
    rotary = getattr(attn, "rotary_ndims", d_head) > 0
    return AttentionWeights(W[0], W[1], W[2], W_O, b[0], b[1], b[2], _bias(attn.dense, d_model, W_O), rotary=rotary)


def _llama_mlp(hf: HFHookedModel, mlp: nn.Module) -> MLPWeights:
    W_in, W_gate = _copy(mlp.up_proj.weight).T, _copy(mlp.gate_proj.weight).T
    if mlp.gate_proj.bias is not None and bool(mlp.gate_proj.bias.any()):
        raise InterplabError(f"{hf.info.spec}: gate_proj has a bias, which MLPWeights cannot represent")
    W_out = _copy(mlp.down_proj.weight).T
    return MLPWeights(W_in.contiguous(), _bias(mlp.up_proj, W_in.shape[1], W_in), W_gate.contiguous(),
                      W_out.contiguous(), _bias(mlp.down_proj, W_out.shape[1], W_out), hf.model.config.hidden_act)


def _gpt2_mlp(hf: HFHookedModel, mlp: nn.Module) -> MLPWeights:
    return MLPWeights(_copy(mlp.c_fc.weight), _copy(mlp.c_fc.bias), None, _copy(mlp.c_proj.weight),
                      _copy(mlp.c_proj.bias), hf.model.config.activation_function)


def _neox_mlp(hf: HFHookedModel, mlp: nn.Module) -> MLPWeights:
    W_in, W_out = _copy(mlp.dense_h_to_4h.weight).T, _copy(mlp.dense_4h_to_h.weight).T
    return MLPWeights(W_in.contiguous(), _bias(mlp.dense_h_to_4h, W_in.shape[1], W_in), None, W_out.contiguous(),
                      _bias(mlp.dense_4h_to_h, W_out.shape[1], W_out), hf.model.config.hidden_act)


_HF_ATTENTION = {"llama": _llama_attention, "gpt2": _gpt2_attention, "gpt_neox": _neox_attention}
_HF_MLP = {"llama": _llama_mlp, "gpt2": _gpt2_mlp, "gpt_neox": _neox_mlp}


def _linear_heads(
    linear: nn.Linear, d_head: int
) -> tuple[Float[torch.Tensor, "head d_model d_head"], Float[torch.Tensor, "head d_head"]]:
    W = _copy(linear.weight)  # [heads·d_head, d_model]
    W_heads = W.reshape(-1, d_head, W.shape[1]).transpose(1, 2).contiguous()
    return W_heads, _bias(linear, W.shape[0], W).reshape(-1, d_head)


# ---- helpers --------------------------------------------------------------------------------------------------
def _copy(t: torch.Tensor) -> torch.Tensor:
    """A detached float32 copy that shares no memory with the model."""
    return t.detach().to(torch.float32, copy=True)


def _bias(module: nn.Module, size: int, like: torch.Tensor) -> Float[torch.Tensor, " n"]:
    bias = getattr(module, "bias", None)
    return _copy(bias) if bias is not None else like.new_zeros(size)


def _gamma(norm: nn.Module) -> Float[torch.Tensor, " d"] | None:
    weight = getattr(norm, "weight", None)
    return None if weight is None else _copy(weight)


def _norm_kind(norm: nn.Module) -> tuple[str, float]:
    """("layernorm" | "rmsnorm" | "none", ε) of a norm module."""
    if isinstance(norm, nn.Identity):
        return "none", 0.0
    if isinstance(norm, nn.LayerNorm):
        return "layernorm", norm.eps
    if "RMSNorm" in type(norm).__name__:
        return "rmsnorm", getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    raise InterplabError(f"cannot fold a norm of type {type(norm).__name__}; supported: LayerNorm, RMSNorm, none")


def _fold(
    W: Float[torch.Tensor, "*head d_model n"], b: Float[torch.Tensor, "*head n"], norm: nn.Module
) -> tuple[Float[torch.Tensor, "*head d_model n"], Float[torch.Tensor, "*head n"]]:
    """W' = diag(γ) W, b' = b + β W: the matrix that reads x̂ where W read γ ⊙ x̂ + β."""
    kind, _ = _norm_kind(norm)
    if kind == "none":
        return W, b
    gamma = _gamma(norm)
    beta = getattr(norm, "bias", None) if kind == "layernorm" else None
    if beta is not None:
        b = b + torch.einsum("d,...dn->...n", _copy(beta), W)
    return (W if gamma is None else W * gamma[:, None]), b


def _hf(model: HookedModel) -> HFHookedModel:
    if not isinstance(model, HFHookedModel):
        raise InterplabError(f"cannot read the weights of {type(model).__name__} ({model.info.arch}); "
                             f"supported: {SUPPORTED}")
    return model


def _family(hf: HFHookedModel) -> str:
    arch = hf.info.arch
    family = "llama" if arch in _LLAMA_FAMILY else arch
    if family not in _HF_ATTENTION:
        raise InterplabError(f"cannot read the weights of HF model type '{arch}'; supported: {SUPPORTED}")
    return family


def _hf_attn(hf: HFHookedModel, layer: int) -> nn.Module:
    return hf.blocks[layer].get_submodule(hf.arch.attn)


def _check_layer(model: HookedModel, layer: int) -> None:
    n = model.info.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise InterplabError(f"layer {layer!r} is out of range for {model.info.spec} ({n} layers): "
                             f"valid layers are 0..{n - 1}")
