"""Tiny models and transcoder sets for the graph tests (float64 where a comparison must be exact)."""

from __future__ import annotations

import torch

from interplab.models import ToyConfig, ToyTransformer
from interplab.sae import SAEConfig, make_sae
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.transcoder import Transcoder


def toy(n_layers: int = 3, d_model: int = 12, d_mlp: int = 20, seed: int = 1, layer_norm: bool = True,
        d_vocab: int = 20) -> ToyTransformer:
    """A random ReLU toy in float64 with random MLP biases (so neurons are on and off)."""
    model = ToyTransformer(ToyConfig(n_layers=n_layers, d_model=d_model, n_heads=2, d_head=6, d_mlp=d_mlp, n_ctx=16,
                                     d_vocab=d_vocab, act_fn="relu", init_std=0.4, seed=seed, layer_norm=layer_norm))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.b_in.copy_(torch.randn(d_mlp, generator=gen) * 0.3)
            block.mlp.b_out.copy_(torch.randn(d_model, generator=gen) * 0.3)
    return model.double().eval()


def transcoder(layer: int, W_enc, b_enc, W_dec, b_dec, arch: str = "relu", W_skip=None, **kw) -> Transcoder:
    sae = make_sae(SAEConfig(arch=arch, d_in=W_enc.shape[0], d_sae=W_enc.shape[1],
                             hook_name=f"blocks.{layer}.mlp.hook_in", apply_b_dec_to_input=False, **kw)).double()
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value)
    return Transcoder(sae, f"blocks.{layer}.hook_mlp_out", W_skip).double()


def exact_set(model: ToyTransformer) -> dict[int, Transcoder]:
    """The MLPs themselves: W_enc = W_in, b_enc = b_in, W_dec = W_out, b_dec = b_out (ReLU)."""
    return {l: transcoder(l, b.mlp.W_in, b.mlp.b_in, b.mlp.W_out, b.mlp.b_out) for l, b in enumerate(model.blocks)}


def noisy_set(model: ToyTransformer, d_sae: int = 24, k: int = 4, skip_layer: int | None = None
              ) -> dict[int, Transcoder]:
    """Random TopK dictionaries (far from exact: large errors), optionally a skip term at one layer."""
    gen = torch.Generator().manual_seed(7)
    d = model.info.d_model
    out = {}
    for l in range(model.info.n_layers):
        skip = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.2 if l == skip_layer else None
        out[l] = transcoder(l, torch.randn(d, d_sae, generator=gen, dtype=torch.float64),
                            torch.randn(d_sae, generator=gen, dtype=torch.float64) * 0.1,
                            torch.randn(d_sae, d, generator=gen, dtype=torch.float64) * 0.3,
                            torch.zeros(d, dtype=torch.float64), arch="topk", k=k, W_skip=skip)
    return out


def prompt(n: int = 7, d_vocab: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, d_vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def clt_from_set(transcoders: dict[int, Transcoder], activation: str = "topk", k: int = 4) -> CrossLayerTranscoder:
    """The per-layer set as a cross-layer transcoder: the same encoders and own-layer decoders, later decoders zero
    (every layer must have the same width and, for topk, the same k)."""
    first = transcoders[0].sae
    clt = CrossLayerTranscoder(len(transcoders), first.cfg.d_in, first.cfg.d_sae, activation=activation, k=k).double()
    with torch.no_grad():
        for l, tc in transcoders.items():
            clt.W_enc[l].copy_(tc.sae.W_enc)
            clt.b_enc[l].copy_(tc.sae.b_enc)
            clt.W_dec[l].zero_()
            clt.W_dec[l][:, 0].copy_(tc.sae.W_dec)
            clt.b_dec[l].copy_(tc.sae.b_dec)
    return clt.eval()


def exact_clt(model: ToyTransformer) -> CrossLayerTranscoder:
    """The MLPs as a CLT (ReLU): W_enc[l] = W_in, b_enc[l] = b_in, own-layer decoder W_out, later decoders zero."""
    return clt_from_set(exact_set(model), activation="relu")


def noisy_clt(model: ToyTransformer, d_sae: int = 16, threshold: float = 1.0, seed: int = 11) -> CrossLayerTranscoder:
    """A random JumpReLU CLT whose every decoder (own layer and every later one) is non-zero."""
    gen = torch.Generator().manual_seed(seed)
    L, d = model.info.n_layers, model.info.d_model
    clt = CrossLayerTranscoder(L, d, d_sae, activation="jumprelu", init_threshold=threshold).double()
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(L, d, d_sae, generator=gen, dtype=torch.float64))
        clt.b_enc.copy_(torch.randn(L, d_sae, generator=gen, dtype=torch.float64) * 0.1)
        for W in clt.W_dec:
            W.copy_(torch.randn(W.shape, generator=gen, dtype=torch.float64) * 0.3)
        clt.b_dec.copy_(torch.randn(L, d, generator=gen, dtype=torch.float64) * 0.1)
    return clt.eval()
