"""`blocks.{l}.mlp.hook_in`: what the MLP reads (a transcoder's input), on every architecture."""

from __future__ import annotations

import torch

from interplab.models import ToyConfig, ToyTransformer, load_model


def _mlp(model, layer: int) -> torch.nn.Module:
    if isinstance(model, ToyTransformer):
        return model.blocks[layer].mlp
    return model.blocks[layer].get_submodule(model.arch.mlp)


def _check(model) -> None:
    tokens = torch.randint(0, model.info.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    names = ["blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_pre"]
    res = model.run_with_cache(tokens, names, return_logits=True)
    assert model.hook_dim("blocks.1.mlp.hook_in") == model.info.d_model
    with torch.no_grad():
        torch.testing.assert_close(_mlp(model, 1)(res.cache["blocks.1.mlp.hook_in"]), res.cache["blocks.1.hook_mlp_out"])
        assert torch.equal(model.forward(tokens), res.logits)  # reading changes nothing
        zeroed = model.run_with_cache(tokens, ["blocks.1.hook_mlp_out"],
                                      hooks=[("blocks.1.mlp.hook_in", lambda a, n: torch.zeros_like(a))])
        expected = _mlp(model, 1)(torch.zeros(2, 7, model.info.d_model))
    torch.testing.assert_close(zeroed.cache["blocks.1.hook_mlp_out"], expected)


def test_mlp_hook_in_on_hf_models(tiny_hf_dir):
    _check(load_model(str(tiny_hf_dir), device="cpu"))


def test_mlp_hook_in_on_the_toy():
    _check(ToyTransformer(ToyConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=20)))
