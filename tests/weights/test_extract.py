"""Extracted, norm-folded weights against what the real modules compute (HF submodules captured with torch hooks,
the toy's own layers), on tiny random models whose norm scales/shifts and biases are randomised so folding matters."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
from transformers.activations import ACT2FN

from interplab.errors import InterplabError
from interplab.models import load_model
from interplab.models.hf import HFHookedModel
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.weights.extract import (
    attention_weights,
    embedding,
    mlp_weights,
    normalize,
    positional_embedding,
    unembedding,
)

ATOL = 2e-5


def _randomise_norms_and_biases(module: nn.Module, seed: int = 0) -> None:
    """Init leaves γ = 1, β = 0 and many biases 0, under which folding is a no-op; make them all non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            is_norm = "norm" in name or ".ln_" in name
            if is_norm and name.endswith("weight"):
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def _tiny_qwen(kind: str) -> HFHookedModel:
    cls = Qwen2Config if kind == "qwen2" else Qwen3Config
    cfg = cls(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, vocab_size=50, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return HFHookedModel(AutoModelForCausalLM.from_config(cfg), None, f"tiny-{kind}")


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir), device="cpu")
    _randomise_norms_and_biases(model.model)
    return model


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def qwen(request):
    model = _tiny_qwen(request.param)
    _randomise_norms_and_biases(model.model)
    return model


def _tokens(model, pos: int = 7) -> torch.Tensor:
    return torch.randint(0, model.info.d_vocab, (2, pos), generator=torch.Generator().manual_seed(3))


def _unscaled(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's own normalisation without γ, β, written from its definition."""
    if isinstance(norm, nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
        return x / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def _capture(model: HFHookedModel, tokens: torch.Tensor, modules: dict[str, nn.Module]) -> dict[str, tuple]:
    """(first input or hidden_states kwarg, all kwargs, output) of each module in one HF forward pass."""
    seen: dict[str, tuple] = {}
    handles = []
    for key, module in modules.items():
        def hook(mod, args, kwargs, out, key=key):
            first = args[0] if args else kwargs["hidden_states"]
            seen[key] = (first, kwargs, out[0] if isinstance(out, tuple) else out)
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model.model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _parts(model: HFHookedModel, layer: int) -> dict[str, nn.Module]:
    """The real submodules of one block: norms, attention, its q/k/v projection(s), MLP."""
    block = model.blocks[layer]
    arch = model.info.arch
    if arch == "gpt2":
        names = {"ln1": "ln_1", "ln2": "ln_2", "attn": "attn", "qkv": "attn.c_attn", "mlp": "mlp"}
    elif arch == "gpt_neox":
        names = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn": "attention",
                 "qkv": "attention.query_key_value", "mlp": "mlp"}
    else:
        names = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn": "self_attn",
                 "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "mlp": "mlp"}
        if arch == "qwen3":
            names |= {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    return {key: block.get_submodule(path) for key, path in names.items()}


def _hf_qkv(model: HFHookedModel, seen: dict) -> tuple[torch.Tensor, ...]:
    """HF's per-head q, k, v [batch pos head d_head] before rotary, split the way each HF forward splits them;
    GQA key/value heads expanded the way HF's repeat_kv does."""
    b, p, _ = seen["ln1"][0].shape
    n, dh, d = model.info.n_heads, model.info.d_head, model.info.d_model
    if model.info.arch == "gpt2":
        q, k, v = seen["qkv"][2].split(d, dim=2)
        return tuple(t.view(b, p, n, dh) for t in (q, k, v))
    if model.info.arch == "gpt_neox":
        return seen["qkv"][2].view(b, p, n, 3 * dh).chunk(3, dim=-1)
    q = seen["q"][2].view(b, p, n, dh)
    k, v = (seen[key][2].view(b, p, -1, dh) for key in ("k", "v"))
    rep = n // k.shape[2]
    return q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def _heads(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bpd,hde->bphe", x, W) + b


def _act(name: str):
    return ACT2FN[name]


def _mlp(w, x: torch.Tensor) -> torch.Tensor:
    pre = x @ w.W_in + w.b_in
    hidden = _act(w.act_fn)(x @ w.W_gate) * pre if w.W_gate is not None else _act(w.act_fn)(pre)
    return hidden @ w.W_out + w.b_out


# ---- HF models ------------------------------------------------------------------------------------------------
def _check_projections_and_mlp(model: HFHookedModel) -> None:
    tokens = _tokens(model)
    for layer in range(model.info.n_layers):
        parts = _parts(model, layer)
        seen = _capture(model, tokens, parts)
        attn, mlp = attention_weights(model, layer), mlp_weights(model, layer)
        x_hat = _unscaled(parts["ln1"], seen["ln1"][0])
        q, k, v = (_heads(x_hat, W, b) for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)))
        hf_q, hf_k, hf_v = _hf_qkv(model, seen)
        if model.info.arch == "qwen3":  # folded q, k = q_norm's output times the rms of the raw projection
            rms = lambda t: torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
            n, dh = model.info.n_heads, model.info.d_head
            hf_q_normed = seen["q_norm"][2].view(*hf_q.shape)
            hf_k_normed = seen["k_norm"][2].view(*seen["k_norm"][2].shape[:2], -1, dh).repeat_interleave(
                n // seen["k_norm"][2].shape[2], dim=2)
            torch.testing.assert_close(q / rms(hf_q), hf_q_normed, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(k / rms(hf_k), hf_k_normed, atol=ATOL, rtol=1e-4)
        else:
            torch.testing.assert_close(q, hf_q, atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(k, hf_k, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(v, hf_v, atol=ATOL, rtol=1e-4)
        # The MLP's norm reads resid_mid, or resid_pre for a parallel residual: either way, its captured input.
        mlp_out = _mlp(mlp, _unscaled(parts["ln2"], seen["ln2"][0]))
        torch.testing.assert_close(mlp_out, seen["mlp"][2], atol=ATOL, rtol=1e-4)


def test_folded_qkv_and_mlp_reproduce_hf_modules(model):
    _check_projections_and_mlp(model)


def test_folded_qkv_and_mlp_reproduce_qwen_modules(qwen):
    """qwen2 has q/k/v biases and no o bias; qwen3 normalises q and k per head."""
    _check_projections_and_mlp(qwen)


def test_one_token_attention_output_is_sum_of_ov_circuits(model):
    tokens = _tokens(model, pos=1)  # the pattern is 1 and rotary at position 0 is the identity
    for layer in range(model.info.n_layers):
        parts = _parts(model, layer)
        seen = _capture(model, tokens, parts)
        w = attention_weights(model, layer)
        x_hat = _unscaled(parts["ln1"], seen["ln1"][0])
        expected = torch.einsum("bphe,hed->bpd", _heads(x_hat, w.W_V, w.b_V), w.W_O) + w.b_O
        torch.testing.assert_close(expected, seen["attn"][2], atol=ATOL, rtol=1e-4)


def test_attention_pattern_from_weights_matches_model(model):
    """The full QK circuit at every position: softmax(rot(q) rot(k)ᵀ/√d_head + causal mask) equals the model's
    pattern, with HF's own rotary function applied to the extracted q, k (no rotary for gpt2)."""
    tokens = _tokens(model)
    layer = model.info.n_layers - 1
    parts = _parts(model, layer)
    seen = _capture(model, tokens, parts)
    w = attention_weights(model, layer)
    assert w.rotary == (model.info.arch != "gpt2")
    x_hat = _unscaled(parts["ln1"], seen["ln1"][0])
    q, k = (_heads(x_hat, W, b).transpose(1, 2) for W, b in ((w.W_Q, w.b_Q), (w.W_K, w.b_K)))  # [b h p e]
    if w.rotary:
        cos, sin = seen["attn"][1]["position_embeddings"]
        q, k = sys.modules[type(parts["attn"]).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    scores = q @ k.transpose(-1, -2) / model.info.d_head ** 0.5
    pos = tokens.shape[1]
    scores = scores.masked_fill(~torch.ones(pos, pos, dtype=torch.bool).tril(), float("-inf"))
    name = f"blocks.{layer}.attn.hook_pattern"
    pattern = model.run_with_cache(tokens, [name]).cache[name]
    torch.testing.assert_close(scores.softmax(-1), pattern, atol=ATOL, rtol=1e-4)


def test_folded_unembedding_reproduces_logits(model):
    tokens = _tokens(model)
    last = f"blocks.{model.info.n_layers - 1}.hook_resid_post"
    res = model.run_with_cache(tokens, [last], return_logits=True)
    resid = res.cache[last]
    x_hat = _unscaled(model.model.get_submodule(model.arch.final_norm), resid)
    torch.testing.assert_close(normalize(model, resid), x_hat, atol=1e-6, rtol=1e-5)
    W_U, b_U = unembedding(model)
    torch.testing.assert_close(x_hat @ W_U + b_U, res.logits, atol=1e-4, rtol=1e-4)
    W_raw, b_raw = unembedding(model, fold_norm=False)
    assert torch.equal(W_raw, model.model.get_output_embeddings().weight.T)
    assert torch.equal(b_raw, torch.zeros(model.info.d_vocab))


def test_embeddings_are_copies_of_the_model_tables(model):
    W_E = embedding(model)
    table = model.model.get_input_embeddings().weight
    assert torch.equal(W_E, table) and W_E.data_ptr() != table.data_ptr()
    W_pos = positional_embedding(model)
    if model.info.arch == "gpt2":
        assert torch.equal(W_pos, model.model.transformer.wpe.weight)
    else:
        assert W_pos is None


def test_unfolded_weights_are_fresh_float32_copies(model):
    w = attention_weights(model, 0, fold_norm=False)
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in w[:-1])
    params = {p.data_ptr() for p in model.model.parameters()}
    assert not params & {t.data_ptr() for t in (*w[:-1], *mlp_weights(model, 0, fold_norm=False)[:-1]) if t is not None}


def test_gqa_repeats_each_kv_head_for_its_query_group():
    model = load_model_tiny_llama()
    dh = model.info.d_head
    attn = model.blocks[1].self_attn
    w = attention_weights(model, 1, fold_norm=False)
    assert w.W_K.shape == (4, 32, dh) and w.W_Q.shape == (4, 32, dh)
    for h in range(4):
        kv = h // 2
        assert torch.equal(w.W_K[h], attn.k_proj.weight[kv * dh:(kv + 1) * dh].T)
        assert torch.equal(w.W_V[h], attn.v_proj.weight[kv * dh:(kv + 1) * dh].T)
        assert torch.equal(w.W_Q[h], attn.q_proj.weight[h * dh:(h + 1) * dh].T)
        assert torch.equal(w.W_O[h], attn.o_proj.weight[:, h * dh:(h + 1) * dh].T)


def load_model_tiny_llama() -> HFHookedModel:
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
    torch.manual_seed(0)
    return HFHookedModel(AutoModelForCausalLM.from_config(cfg), None, "tiny-llama")


# ---- toy model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    model = ToyTransformer(ToyConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=11,
                                     init_std=0.3))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.split(".")[-1].startswith("W_"):  # LayerNorm γ, β and every bias
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn(param.shape, generator=gen))
    return model.eval()


def test_toy_folded_weights_reproduce_its_layers(toy):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(6))
    for layer, block in enumerate(toy.blocks):
        w, m = attention_weights(toy, layer), mlp_weights(toy, layer)
        with torch.no_grad():
            normed = block.ln1(x)
            q_ref = torch.einsum("bpd,hde->bphe", normed, block.attn.W_Q) + block.attn.b_Q
            v_ref = torch.einsum("bpd,hde->bphe", normed, block.attn.W_V) + block.attn.b_V
            mlp_ref = block.mlp(block.ln2(x))
        x1, x2 = _unscaled(block.ln1, x), _unscaled(block.ln2, x)
        torch.testing.assert_close(_heads(x1, w.W_Q, w.b_Q), q_ref, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(_heads(x1, w.W_V, w.b_V), v_ref, atol=ATOL, rtol=1e-4)
        assert m.W_gate is None and m.act_fn == "gelu"
        hidden = torch.nn.functional.gelu(x2 @ m.W_in + m.b_in)
        torch.testing.assert_close(hidden @ m.W_out + m.b_out, mlp_ref, atol=ATOL, rtol=1e-4)


def test_toy_unfolded_weights_are_its_parameters(toy):
    attn, mlp = toy.blocks[1].attn, toy.blocks[1].mlp
    w, m = attention_weights(toy, 1, fold_norm=False), mlp_weights(toy, 1, fold_norm=False)
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        assert torch.equal(getattr(w, name), getattr(attn, name))
        assert getattr(w, name).data_ptr() != getattr(attn, name).data_ptr()
    for name in ("W_in", "b_in", "W_out", "b_out"):
        assert torch.equal(getattr(m, name), getattr(mlp, name))
    assert w.rotary is False
    W_U, b_U = unembedding(toy, fold_norm=False)
    assert torch.equal(W_U, toy.W_U) and torch.equal(b_U, toy.b_U)
    assert torch.equal(embedding(toy), toy.W_E) and torch.equal(positional_embedding(toy), toy.W_pos)


def test_toy_folded_unembedding_reproduces_logits(toy):
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(7))
    res = toy.run_with_cache(tokens, ["blocks.1.hook_resid_post"], return_logits=True)
    W_U, b_U = unembedding(toy)
    x_hat = _unscaled(toy.ln_final, res.cache["blocks.1.hook_resid_post"])
    torch.testing.assert_close(x_hat @ W_U + b_U, res.logits, atol=ATOL, rtol=1e-4)


def test_toy_without_layernorm_folds_nothing():
    toy = ToyTransformer(ToyConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, layer_norm=False))
    w, raw = attention_weights(toy, 0), attention_weights(toy, 0, fold_norm=False)
    assert all(torch.equal(a, b) for a, b in zip(w[:-1], raw[:-1]))
    x = torch.randn(4, 8)
    assert torch.equal(normalize(toy, x), x)


# ---- errors ---------------------------------------------------------------------------------------------------
def test_layer_out_of_range_says_the_valid_range(toy):
    for layer in (-1, 2, True):
        with pytest.raises(InterplabError, match=r"valid layers are 0\.\.1"):
            attention_weights(toy, layer)
        with pytest.raises(InterplabError, match=r"valid layers are 0\.\.1"):
            mlp_weights(toy, layer)


def test_mlp_of_attention_only_model_is_refused():
    toy = ToyTransformer(ToyConfig(n_layers=1, d_mlp=None))
    with pytest.raises(InterplabError, match="attention-only"):
        mlp_weights(toy, 0)


def test_toy_with_its_own_embedding_has_no_W_E():
    class Shifted(ToyTransformer):
        def _embed(self, tokens):
            return super()._embed(tokens) + 1

    with pytest.raises(InterplabError, match="no token embedding"):
        embedding(Shifted(ToyConfig(n_layers=1)))


def test_unsupported_model_lists_the_supported_ones(toy):
    class Other(HFHookedModel):
        def __init__(self):  # no HF module: only the info a reader looks at first
            self.info = replace(toy.info, arch="bert")

    with pytest.raises(InterplabError, match="supported: .*gpt2.*gpt_neox.*llama"):
        attention_weights(Other(), 0)


# ---- the real model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_shapes_and_one_token_attention_output():
    model = load_model("smollm2-135m", device="cpu")
    layer = 7
    w, m = attention_weights(model, layer), mlp_weights(model, layer)
    assert w.W_Q.shape == w.W_K.shape == w.W_V.shape == (9, 576, 64) and w.W_O.shape == (9, 64, 576)
    assert w.rotary and m.W_in.shape == m.W_gate.shape == (576, 1536) and m.act_fn == "silu"
    k_proj = model.blocks[layer].self_attn.k_proj
    assert k_proj.out_features == 3 * 64  # 3 KV heads shared by groups of 3 query heads
    raw_K = attention_weights(model, layer, fold_norm=False).W_K
    for h in range(9):
        assert torch.equal(raw_K[h], k_proj.weight[64 * (h // 3):64 * (h // 3 + 1)].T)
    assert unembedding(model)[0].shape == (576, 49152) and positional_embedding(model) is None
    tokens = torch.tensor([[model.tokenizer.encode("Hello")[0]]])
    parts = _parts(model, layer)
    seen = _capture(model, tokens, parts)
    x_hat = _unscaled(parts["ln1"], seen["ln1"][0])
    expected = torch.einsum("bphe,hed->bpd", _heads(x_hat, w.W_V, w.b_V), w.W_O) + w.b_O
    torch.testing.assert_close(expected, seen["attn"][2], atol=1e-4, rtol=1e-4)
