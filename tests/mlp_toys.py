"""Toys shared by the transcoder tests of several folders: a ReLU toy transformer with dead neurons, and its MLPs
written as a cross-layer transcoder (exact, so every known answer about CLTs can be checked against the model)."""

from __future__ import annotations

import torch

from interplab.models import ToyConfig, ToyTransformer
from interplab.sae.crosslayer import CrossLayerTranscoder

D, D_MLP, N_DEAD, L = 16, 32, 3, 2


def toy_model() -> ToyTransformer:
    """A 2-layer ReLU toy with random MLP biases, N_DEAD neurons per layer that can never fire."""
    model = ToyTransformer(ToyConfig(n_layers=L, d_model=D, n_heads=2, d_head=8, d_mlp=D_MLP, n_ctx=16, d_vocab=20,
                                     act_fn="relu", init_std=0.4, seed=1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.b_in.copy_(torch.randn(D_MLP, generator=gen) * 0.3)
            block.mlp.b_in[:N_DEAD] = -100.0
            block.mlp.b_out.copy_(torch.randn(D, generator=gen) * 0.3)
    return model.eval()


def mlp_clt(model: ToyTransformer) -> CrossLayerTranscoder:
    """The MLPs as a CLT, in the model's dtype: W_enc[l] = W_in, b_enc[l] = b_in, own-layer decoder W_out, later-layer
    decoders zero."""
    n_layers, d, F = model.info.n_layers, model.info.d_model, model.info.d_mlp
    clt = CrossLayerTranscoder(n_layers, d, F, activation="relu").to(model.blocks[0].mlp.W_in.dtype)
    with torch.no_grad():
        for l, block in enumerate(model.blocks):
            clt.W_enc[l].copy_(block.mlp.W_in)
            clt.b_enc[l].copy_(block.mlp.b_in)
            clt.W_dec[l].zero_()
            clt.W_dec[l][:, 0].copy_(block.mlp.W_out)
            clt.b_dec[l].copy_(block.mlp.b_out)
    return clt
