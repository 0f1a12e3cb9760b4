"""Per-head hook points (q, k, v, rotated q/k, scores, z, result), norm scales and mlp.hook_pre on tiny random models
of every architecture: checked against hand computations from other cached activations and against weight edits."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config

from interplab.errors import InterplabError
from interplab.models import ToyConfig, ToyTransformer
from interplab.models.hf import HFHookedModel

ARCHS = ["llama", "qwen2", "gpt2", "neox", "neox-sequential", "qwen3", "toy"]
EAGER = ("attn.hook_attn_scores", "attn.hook_pattern")  # switch HF models to eager attention: not bit-exact
NEW_POINTS = ("ln1.hook_scale", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
              "attn.hook_attn_scores", "attn.hook_z", "attn.hook_result", "ln2.hook_scale", "mlp.hook_pre")


def _hf_config(arch: str):
    common = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, vocab_size=60,
                  max_position_embeddings=32)
    if arch == "llama":  # grouped-query attention: 2 heads share each k/v head
        return LlamaConfig(**common, num_key_value_heads=2)
    if arch == "qwen2":  # biases on q, k, v
        return Qwen2Config(**common, num_key_value_heads=1)
    if arch == "qwen3":  # q_norm / k_norm inside attention, a head_dim that is not hidden_size / heads
        return Qwen3Config(**common, num_key_value_heads=2, head_dim=12)
    if arch.startswith("neox"):  # partial rotary: only half of each head's dims rotate
        return GPTNeoXConfig(**common, rotary_pct=0.5, use_parallel_residual=arch == "neox")
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=60, n_positions=32)


def _build(arch: str):
    if arch == "toy":
        model = ToyTransformer(ToyConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, n_ctx=32, d_vocab=60,
                                         init_std=0.2))
    else:
        torch.manual_seed(0)
        model = HFHookedModel(AutoModelForCausalLM.from_config(_hf_config(arch)), None, arch)
    # Weights and biases far from their initial 1s and 0s, so that every weight and bias is seen.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in (model.parameters() if arch == "toy" else model.model.parameters()):
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return _build(request.param)


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.info.d_vocab, (2, 9), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def cached(model, tokens):
    return model.run_with_cache(tokens, return_logits=True)


def _is_toy(model) -> bool:
    return isinstance(model, ToyTransformer)


def _out_proj(model, layer: int) -> nn.Module:
    attn = model.blocks[layer].get_submodule(model.arch.attn)
    return attn.get_submodule(model.arch.attn_out_proj)


def _b_O(model, layer: int) -> torch.Tensor:
    if _is_toy(model):
        return model.blocks[layer].attn.b_O
    bias = _out_proj(model, layer).bias
    return bias if bias is not None else torch.zeros(model.info.d_model)


def _norm(model, name: str) -> nn.Module:
    if name == "ln_final":
        return model._final_norm_module()
    layer, which = int(name.split(".")[1]), name.split(".")[2]
    if _is_toy(model):
        return getattr(model.blocks[layer], which)
    return model.blocks[layer].get_submodule(model.arch.ln1 if which == "ln1" else model.arch.ln2)


@contextlib.contextmanager
def _zeroed_head(model, layer: int, head: int) -> Iterator[None]:
    """The head's slice of the output projection weight set to zero (restored after)."""
    d_head = model.info.d_head
    if _is_toy(model):
        weight, index = model.blocks[layer].attn.W_O, (head,)
    else:
        proj = _out_proj(model, layer)
        cols = slice(head * d_head, (head + 1) * d_head)
        weight, index = proj.weight, ((slice(None), cols) if isinstance(proj, nn.Linear) else (cols,))
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[index] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_names_and_shapes(model, cached):
    info, c = model.info, cached.cache
    b, p = 2, 9
    kv = {"llama": 2, "qwen3": 2, "qwen2": 1}.get(info.arch, info.n_heads)
    assert info.n_kv_heads == kv
    shapes = {"attn.hook_q": (b, p, info.n_heads, info.d_head), "attn.hook_k": (b, p, kv, info.d_head),
              "attn.hook_v": (b, p, kv, info.d_head), "attn.hook_attn_scores": (b, info.n_heads, p, p),
              "attn.hook_z": (b, p, info.n_heads, info.d_head), "attn.hook_result": (b, p, info.n_heads, info.d_model),
              "ln1.hook_scale": (b, p, 1), "ln2.hook_scale": (b, p, 1), "mlp.hook_pre": (b, p, info.d_mlp)}
    rotary = info.arch not in ("gpt2", "toy")
    if rotary:
        shapes |= {"attn.hook_rot_q": shapes["attn.hook_q"], "attn.hook_rot_k": shapes["attn.hook_k"]}
    assert ("blocks.0.attn.hook_rot_q" in model.hook_names) == rotary
    for point, shape in shapes.items():
        assert tuple(c[f"blocks.1.{point}"].shape) == shape, point
    assert tuple(c["ln_final.hook_scale"].shape) == (b, p, 1)
    assert model.hook_dim("blocks.0.attn.hook_z") is None and model.hook_dim("blocks.0.ln1.hook_scale") == 1
    assert model.hook_dim("blocks.0.mlp.hook_pre") == info.d_mlp


def test_reading_every_point_leaves_the_logits_unchanged(model, tokens):
    plain = model.forward(tokens)
    exact = [n for n in model.hook_names if not n.endswith(EAGER) or _is_toy(model)]
    with torch.no_grad():
        assert torch.equal(model.run_with_cache(tokens, exact, return_logits=True).logits, plain)
        everything = model.run_with_cache(tokens, return_logits=True).logits  # eager attention: rounding differs
    torch.testing.assert_close(everything, plain, rtol=1e-5, atol=1e-5)


def test_results_sum_to_attn_out(model, cached):
    for layer in range(model.info.n_layers):
        result = cached.cache[f"blocks.{layer}.attn.hook_result"]
        torch.testing.assert_close(result.sum(2) + _b_O(model, layer).detach(),
                                   cached.cache[f"blocks.{layer}.hook_attn_out"], rtol=1e-5, atol=1e-5)


def test_z_and_pattern_by_hand_from_q_k_v(model, cached):
    """z = softmax(q kᵀ / √d_head + causal mask) v with each k/v head repeated for the q heads sharing it."""
    c, info = cached.cache, model.info
    rot = "attn.hook_rot_" if "blocks.0.attn.hook_rot_q" in model.hook_names else "attn.hook_"
    for layer in range(info.n_layers):
        q, k = c[f"blocks.{layer}.{rot}q"], c[f"blocks.{layer}.{rot}k"]
        v = c[f"blocks.{layer}.attn.hook_v"]
        n_rep = info.n_heads // info.n_kv_heads
        k, v = k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / info.d_head ** 0.5
        p = q.shape[1]
        scores = scores.masked_fill(~torch.ones(p, p, dtype=torch.bool).tril(), float("-inf"))
        pattern = scores.softmax(-1)
        torch.testing.assert_close(pattern, c[f"blocks.{layer}.attn.hook_pattern"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c[f"blocks.{layer}.attn.hook_attn_scores"].softmax(-1), pattern,
                                   rtol=1e-5, atol=1e-6)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        torch.testing.assert_close(c[f"blocks.{layer}.attn.hook_z"], z, rtol=1e-5, atol=1e-5)


def test_scales_by_hand(model, cached):
    c = cached.cache
    last = model.info.n_layers - 1
    inputs = {"ln_final": c[f"blocks.{last}.hook_resid_post"]}
    for layer in range(model.info.n_layers):
        inputs[f"blocks.{layer}.ln1"] = c[f"blocks.{layer}.hook_resid_pre"]
        mid = f"blocks.{layer}.hook_resid_mid"
        inputs[f"blocks.{layer}.ln2"] = c[mid] if mid in c else c[f"blocks.{layer}.hook_resid_pre"]  # parallel NeoX
    for name, x in inputs.items():
        norm = _norm(model, name)
        if isinstance(norm, nn.LayerNorm):
            want = ((x - x.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True).add(norm.eps).sqrt()
        else:
            want = (x ** 2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt()
        torch.testing.assert_close(c[f"{name}.hook_scale"], want, rtol=1e-5, atol=1e-6)


def test_normalize_final_with_the_cached_scale_gives_the_logits(model, cached):
    last = model.info.n_layers - 1
    resid, scale = cached.cache[f"blocks.{last}.hook_resid_post"], cached.cache["ln_final.hook_scale"]
    normalized = model.normalize_final(resid, scale)
    torch.testing.assert_close(normalized, cached.cache["ln_final.hook_normalized"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        logits = model._unembed(model._weigh_normalized(normalized))
        torch.testing.assert_close(logits, cached.logits, rtol=1e-5, atol=1e-5)
        parts = model.normalize_final(resid * 0.3, scale) + model.normalize_final(resid * 0.7, scale)
    torch.testing.assert_close(parts, normalized, rtol=1e-5, atol=1e-5)  # linear in resid for a frozen scale


@pytest.mark.parametrize("point", ["attn.hook_z", "attn.hook_result"])
def test_zeroing_a_head_equals_zeroing_its_output_weights(model, tokens, point):
    layer, head = 1, 2

    def zero_head(act, _name):
        act = act.clone()
        act[:, :, head] = 0
        return act

    with torch.no_grad():
        edited = model.run_with_hooks(tokens, [(f"blocks.{layer}.{point}", zero_head)])
        with _zeroed_head(model, layer, head):
            want = model.forward(tokens)
    assert not torch.allclose(edited, model.forward(tokens), atol=1e-4)  # the head mattered
    torch.testing.assert_close(edited, want, rtol=1e-5, atol=1e-5)


def test_editing_q_of_one_head_moves_only_that_head(model, tokens):
    """A zeroed query head gives a uniform causal pattern on that head (scores 0) and leaves the others alone; this
    pins where each head's q sits in fused and interleaved projections."""
    layer, head = 1, 1

    def zero_q(act, _name):
        act = act.clone()
        act[:, :, head] = 0
        return act

    names = [f"blocks.{layer}.attn.hook_pattern"]
    clean = model.run_with_cache(tokens, names).cache[names[0]]
    zeroed = model.run_with_cache(tokens, names, hooks=[(f"blocks.{layer}.attn.hook_q", zero_q)]).cache[names[0]]
    p = tokens.shape[1]
    uniform = torch.ones(p, p).tril() / torch.arange(1, p + 1)[:, None]
    torch.testing.assert_close(zeroed[:, head], uniform.expand_as(zeroed[:, head]), rtol=1e-5, atol=1e-6)
    others = [h for h in range(model.info.n_heads) if h != head]
    torch.testing.assert_close(zeroed[:, others], clean[:, others], rtol=1e-5, atol=1e-6)


def test_editing_a_scale(model, tokens, cached):
    """The cached scale back in changes nothing; twice the scale is the norm with half its weight."""
    for name in ("blocks.1.ln1", "blocks.0.ln2", "ln_final"):
        hook = f"{name}.hook_scale"
        with torch.no_grad():
            same = model.run_with_hooks(tokens, [(hook, lambda act, _n: cached.cache[hook].clone())])
            torch.testing.assert_close(same, cached.logits, rtol=1e-5, atol=1e-5)
            doubled = model.run_with_hooks(tokens, [(hook, lambda act, _n: act * 2)])
            weight = _norm(model, name).weight
            saved = weight.detach().clone()
            weight.mul_(0.5)
            try:
                want = model.forward(tokens)
            finally:
                weight.copy_(saved)
        torch.testing.assert_close(doubled, want, rtol=1e-5, atol=1e-5)
    halved = model.run_with_cache(tokens, ["ln_final.hook_normalized"],
                                  hooks=[("ln_final.hook_scale", lambda act, _n: act * 2)]).cache
    torch.testing.assert_close(halved["ln_final.hook_normalized"], cached.cache["ln_final.hook_normalized"] / 2,
                               rtol=1e-5, atol=1e-6)


def test_in_place_edits_count(model, tokens):
    """An edit made in place (the hook returns None) acts like the same edit returned."""

    def halve_in_place(act, _name):
        act.mul_(0.5)

    with torch.no_grad():
        # hook_v rather than hook_k: qwen3's k_norm would undo a scaled k
        for point in ("blocks.1.attn.hook_result", "blocks.1.ln1.hook_scale", "blocks.0.attn.hook_v"):
            returned = model.run_with_hooks(tokens, [(point, lambda act, _n: act * 0.5)])
            torch.testing.assert_close(model.run_with_hooks(tokens, [(point, halve_in_place)]), returned)
            assert not torch.allclose(returned, model.forward(tokens), atol=1e-5)


def _splice_edit(act: torch.Tensor) -> torch.Tensor:
    return act * 1.5 + 0.05 if act.shape[-1] != act.shape[-2] else act * 0.9  # patterns/scores: keep them sane


@pytest.mark.parametrize("point", [*NEW_POINTS, "ln_final.hook_scale"])
def test_splice_at_every_new_point_equals_the_hooked_pass(model, tokens, point):
    hook = point if point.startswith("ln_final") else f"blocks.1.{point}"
    if hook not in model.hook_names:
        with pytest.raises(InterplabError, match="unknown hook name"):
            model.run_prefix(tokens, hook)
        return
    prefix = model.run_prefix(tokens, hook)
    with torch.no_grad():
        spliced = model.run_suffix(prefix, _splice_edit(prefix.act))
        hooked = model.run_with_hooks(tokens, [(hook, lambda act, _n: _splice_edit(act))])
    assert not torch.allclose(spliced, model.forward(tokens), atol=1e-4)
    torch.testing.assert_close(spliced, hooked, rtol=1e-5, atol=1e-5)


def test_a_wrong_shape_is_a_clear_error(model, tokens):
    with pytest.raises(InterplabError, match=r"hook function for 'blocks.0.attn.hook_k' returned \(2, 9, 1\)"):
        model.run_with_hooks(tokens, [("blocks.0.attn.hook_k", lambda act, _n: act[..., :1, 0])])


@pytest.mark.slow
def test_smollm2_heads_sum_to_attn_out_and_reads_change_nothing():
    """The real SmolLM2-135M (9 query heads sharing 3 key-value heads)."""
    from interplab.models import load_model

    model = load_model("smollm2-135m")
    tokens = torch.randint(0, model.info.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    assert (model.info.n_heads, model.info.n_kv_heads) == (9, 3)
    names = [n for n in model.hook_names if not n.endswith(EAGER)]
    res = model.run_with_cache(tokens, names, return_logits=True)
    assert torch.equal(res.logits, model.forward(tokens))
    for layer in (0, model.info.n_layers - 1):
        torch.testing.assert_close(res.cache[f"blocks.{layer}.attn.hook_result"].sum(2),
                                   res.cache[f"blocks.{layer}.hook_attn_out"], rtol=1e-4, atol=1e-4)


def test_rotary_reads_under_an_eager_default_are_exact():
    """With attn_implementation="eager" the rotary hooks call the model's own eager function: no bit changes."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_hf_config("llama"), attn_implementation="eager")
    model = HFHookedModel(hf, None, "llama-eager")
    tokens = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        res = model.run_with_cache(tokens, ["blocks.0.attn.hook_rot_q", "blocks.1.attn.hook_rot_k"], return_logits=True)
        assert torch.equal(res.logits, model.forward(tokens))
    assert hf.config._attn_implementation == "eager"  # restored


def test_edits_on_offloaded_layers_equal_the_plain_model(tiny_llama_dir, tmp_path):
    """Layers whose weights accelerate keeps on disk between calls: hook_result and an edited scale fetch them."""
    from interplab.models import load_model

    disk = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "disk", "lm_head": "disk"}
    plain = load_model(str(tiny_llama_dir), device="cpu")
    offloaded = load_model(str(tiny_llama_dir), device_map=disk, offload_folder=str(tmp_path))
    tokens = torch.randint(0, plain.info.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))

    def zero_head_1(act, _name):
        act = act.clone()
        act[:, :, 1] = 0
        return act

    edits = [("blocks.1.attn.hook_result", zero_head_1), ("blocks.2.ln2.hook_scale", lambda act, _n: act * 2),
             ("ln_final.hook_scale", lambda act, _n: act * 1.5)]
    with torch.no_grad():
        for edit in edits:
            want = plain.run_with_hooks(tokens, [edit])
            assert not torch.allclose(want, plain.forward(tokens), atol=1e-4)
            assert torch.equal(offloaded.run_with_hooks(tokens, [edit]), want), edit[0]
