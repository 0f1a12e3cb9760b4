"""Weight orthogonalisation: same logits as hook ablation, edits only the residual writers, saves a loadable model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from interplab.errors import InterplabError
from interplab.models import load_model
from interplab.models.hf import HFHookedModel
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.probes.orthogonalize import PROVENANCE_FILE, orthogonalize_weights, save_orthogonalized
from interplab.probes.steer import ablation_hooks


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(str(tiny_hf_dir), device="cpu")


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.info.d_vocab, (3, 10), generator=torch.Generator().manual_seed(7))


def _direction(d_model: int) -> torch.Tensor:
    return 2.0 * torch.randn(d_model, generator=torch.Generator().manual_seed(11))


def _params(model: HFHookedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.named_parameters(remove_duplicate=False)}


def test_orthogonalized_weights_match_hook_ablation(model, tokens):
    r = _direction(model.info.d_model)
    before = _params(model)
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, r)
    with torch.no_grad():
        hooked = model.run_with_hooks(tokens, ablation_hooks(model, r))
        baked = edited.forward(tokens)
        clean = model.forward(tokens)
    torch.testing.assert_close(baked, hooked, atol=1e-4, rtol=1e-4)
    assert (baked - clean).abs().max() > 1e-3  # the edit did something
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())  # the original is untouched


def test_only_residual_writers_change_and_they_write_no_component(model):
    r = _direction(model.info.d_model)
    unit = r / r.norm()
    edited = copy.deepcopy(model)
    before = _params(model)
    orthogonalize_weights(edited, r)
    changed = {k for k, v in _params(edited).items() if not torch.equal(v, before[k])}
    writers = {"wte", "wpe", "embed_tokens", "embed_in", "attn.c_proj", "mlp.c_proj", "o_proj", "down_proj",
               "attention.dense", "dense_4h_to_h"}
    assert changed and all(any(w in k for w in writers) for k in changed), changed
    assert not any("lm_head" in k or "embed_out" in k for k in changed)
    with torch.no_grad():
        emb = edited.model.get_input_embeddings().weight
        assert float((emb @ unit).abs().max()) < 1e-6
        # every attention / MLP output projection, whatever its input, writes nothing along r̂ (bias included)
        attn_proj = {"gpt2": "attn.c_proj", "llama": "self_attn.o_proj", "gpt_neox": "attention.dense"}
        for block in edited.blocks:
            for path in (attn_proj[model.info.arch], edited.arch.mlp_out_proj):
                proj = block.get_submodule(path)
                d_in = proj.weight.shape[0] if model.info.arch == "gpt2" else proj.weight.shape[1]  # Conv1D: [in, out]
                assert float((proj(torch.randn(5, d_in)) @ unit).abs().max()) < 1e-5


def test_gpt2_tied_embeddings_are_untied_first(tiny_gpt2_dir):
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    hf = model.model
    assert hf.lm_head.weight is hf.transformer.wte.weight
    wte = hf.transformer.wte.weight.detach().clone()
    orthogonalize_weights(model, _direction(model.info.d_model))
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    assert torch.equal(hf.lm_head.weight, wte)  # the unembedding keeps the original, as with hook ablation
    assert not torch.equal(hf.transformer.wte.weight, wte)
    assert hf.config.tie_word_embeddings is False


def test_saved_model_reloads_with_the_same_logits(model, tokens, tmp_path):
    r = _direction(model.info.d_model)
    before = _params(model)
    out = save_orthogonalized(model, r, tmp_path / "ortho")
    assert out == tmp_path / "ortho" and [p.name for p in tmp_path.iterdir()] == ["ortho"]  # no temp folders left
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())
    with torch.no_grad():
        hooked = model.run_with_hooks(tokens, ablation_hooks(model, r))
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(tokens).logits
        via_interplab = load_model(str(out), device="cpu").forward(tokens)
    torch.testing.assert_close(reloaded, hooked, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(via_interplab, hooked, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out)("a fox").input_ids == model.tokenizer("a fox").input_ids
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    torch.testing.assert_close(torch.tensor(provenance["direction_unit"]), r / r.norm())


def test_save_from_a_spec_and_overwrite(tiny_gpt2_dir, tmp_path):
    r = _direction(32)
    out = tmp_path / "from-spec"
    save_orthogonalized(str(tiny_gpt2_dir), r, out)
    first = load_model(str(out), device="cpu")
    assert first.model.lm_head.weight is not first.model.transformer.wte.weight
    with pytest.raises(InterplabError, match="already exists and is not empty; pass overwrite=True"):
        save_orthogonalized(str(tiny_gpt2_dir), r, out)
    save_orthogonalized(str(tiny_gpt2_dir), -r, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-spec"]


def test_errors(tiny_gpt2_dir, tmp_path):
    toy = ToyTransformer(ToyConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=11))
    with pytest.raises(InterplabError, match="needs an HFHookedModel .* got ToyTransformer .*ablation_hooks"):
        orthogonalize_weights(toy, torch.ones(16))  # type: ignore[arg-type]
    with pytest.raises(InterplabError, match="needs an HFHookedModel .* got Module"):
        save_orthogonalized(torch.nn.Module(), torch.ones(16), tmp_path / "x")  # type: ignore[arg-type]
    model = load_model(str(tiny_gpt2_dir), device="cpu")
    with pytest.raises(InterplabError, match=r"shape \[d_model\] = \[32\], got \(16,\)"):
        orthogonalize_weights(model, torch.ones(16))
    with pytest.raises(InterplabError, match="zero vector"):
        save_orthogonalized(model, torch.zeros(32), tmp_path / "y")
    assert not (tmp_path / "y").exists()
