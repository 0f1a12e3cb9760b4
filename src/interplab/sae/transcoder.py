"""`Transcoder`: a sparse dictionary that replaces an MLP, reading the MLP's input and writing its output.

    f   = activation((x_in − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc)      the wrapped SAE's encoder
    ŷ   = f @ W_dec + b_dec  (+ x_in @ W_skip for a skip transcoder)           predicts hook_mlp_out

The dictionary itself is any `SparseAutoencoder` (ReLU, TopK, BatchTopK, JumpReLU, Matryoshka): a transcoder is that
SAE trained against a target other than its input (`training_forward(x, target=y)`), plus the name of the hook it
writes and an optional linear skip connection (Paulo et al. 2025, "Transcoders beat sparse autoencoders"). For an MLP
both ends have width d_model, so the SAE's `d_in` is also the output width.

Files (`save`; loading is transcoder_files.py): TopK transcoders in sparsify's layout (sparsify trains TopK
transcoders; SAELens has no TopK transcoder class), the others in SAELens's transcoder layout, where batchtopk and
matryoshka are the JumpReLU they are at inference:

    SAELens   cfg.json {architecture: transcoder | skip_transcoder | jumprelu_transcoder | jumprelu_skip_transcoder,
                        d_in, d_sae, d_out, apply_b_dec_to_input: false, metadata {hook_name, hook_name_out, ...},
                        interplab {...}}
              sae_weights.safetensors {W_enc [d_in, F], W_dec [F, d_out], b_enc, b_dec [d_out], threshold (jumprelu),
                                       W_skip [d_out, d_in] (SAELens applies x @ W_skipᵀ)}
    sparsify  cfg.json {activation: topk, k, num_latents, d_in, transcode: true, skip_connection, interplab {...}}
              sae.safetensors {encoder.weight [F, d_in], encoder.bias [F], W_dec [F, d_out], b_dec [d_out],
                               W_skip [d_out, d_in] (sparsify too applies x @ W_skipᵀ)}

Neither format lets the encoder subtract b_dec (it lives in the output space): an SAE that does is saved with
the subtraction folded into b_enc, b_enc − b_dec @ W_enc, which gives the same pre-activations.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import NamedTuple

import torch
from jaxtyping import Float
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from interplab.errors import InterplabError
from interplab.fileio import join, write_url_atomic
from interplab.models.hooks import parse_block_hook
from interplab.runs import JSONDict, JSONValue
from interplab.sae.base import SparseAutoencoder
from interplab.sae.layout import (
    CFG_FILE,
    FORMAT_VERSION,
    SAELENS_FORMAT_VERSION,
    SAELENS_TRANSCODER_ARCH,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
)

LAYOUTS = ("auto", "saelens", "sparsify")
"""Transcoder file layouts `Transcoder.save` writes (auto: sparsify for topk, SAELens for the others)."""


class Transcoder(nn.Module):
    """An MLP replacement: latents from `in_hook` (the MLP's input), decoded to `out_hook` (the MLP's output)."""

    def __init__(self, sae: SparseAutoencoder, out_hook: str, W_skip: Tensor | None = None):
        super().__init__()
        self.sae = sae
        self.out_hook = out_hook
        d = sae.cfg.d_in
        if W_skip is not None and tuple(W_skip.shape) != (d, d):
            raise InterplabError(f"W_skip must have shape ({d}, {d}), got {tuple(W_skip.shape)}")
        self.W_skip = nn.Parameter(W_skip) if W_skip is not None else None

    @property
    def in_hook(self) -> str:
        """The hook the transcoder reads (its SAE's hook_name), e.g. `blocks.6.mlp.hook_in`."""
        return self.sae.cfg.hook_name

    @property
    def layer(self) -> int:
        """The block whose MLP this transcoder replaces."""
        parsed = parse_block_hook(self.out_hook)
        if parsed is None:
            raise InterplabError(f"transcoder output hook {self.out_hook!r} is not a block's hook")
        return parsed[0]

    def encode(self, x_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.sae.encode(x_in)

    def decode(self, f: Float[Tensor, "... d_sae"], x_in: Float[Tensor, "... d_in"] | None = None
               ) -> Float[Tensor, "... d_out"]:
        """ŷ = f @ W_dec + b_dec, plus x_in @ W_skip for a skip transcoder (which then needs x_in)."""
        out = self.sae.decode(f)
        if self.W_skip is not None:
            if x_in is None:
                raise InterplabError("a skip transcoder's decode needs the input x_in for its W_skip term")
            out = out + x_in @ self.W_skip
        return out

    def forward(self, x_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return self.decode(self.encode(x_in), x_in)

    @property
    def device(self) -> torch.device:
        return self.sae.W_enc.device

    @torch.no_grad()
    def fold_scales(self, scale_in: float, scale_out: float) -> None:
        """Fold input and output scalings in: trained on (x·s_in → y·s_out), it afterwards maps raw x to raw y.

        The SAE's `fold_input_scale(s_in)` makes it read raw x and write ŷ·s_out/s_in: dividing W_dec and b_dec
        by s_out/s_in more gives ŷ. The skip term (x·s_in) W_skip = ŷ_skip·s_out gives W_skip ← W_skip·s_in/s_out.
        """
        if not (scale_in > 0 and scale_out > 0):
            raise InterplabError(f"fold_scales needs positive scales, got {scale_in} and {scale_out}")
        self.sae.fold_input_scale(scale_in)
        self.sae.W_dec.mul_(scale_in / scale_out)
        self.sae.b_dec.mul_(scale_in / scale_out)
        if self.W_skip is not None:
            self.W_skip.mul_(scale_in / scale_out)

    # ---- files --------------------------------------------------------------------------------------------
    def save(self, path: str, *, metadata: Mapping[str, JSONValue] | None = None, layout: str = "auto") -> None:
        """Save as a folder: sparsify's transcoder layout for topk, SAELens's for the others (`layout` forces one;
        see the module docstring). The weights are written first: a folder whose cfg.json exists is complete."""
        arch = self.sae.cfg.arch
        if layout not in LAYOUTS:
            raise InterplabError(f"unknown transcoder layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        if layout == "auto":
            layout = "sparsify" if arch == "topk" else "saelens"
        if (layout == "sparsify") != (arch == "topk"):
            raise InterplabError(f"a {arch} transcoder cannot be saved in the {layout} layout: sparsify holds TopK "
                                 "transcoders, SAELens ReLU and JumpReLU ones (batchtopk/matryoshka as JumpReLU)")
        sae = _encoder_reads_x(self.sae)
        ours: JSONDict = {"format": FORMAT_VERSION, **sae.cfg.to_dict(), "out_hook": self.out_hook,
                          "skip": self.W_skip is not None}
        if arch in ("batchtopk", "matryoshka"):
            ours["threshold_updates"] = int(sae.threshold_updates)
        W_skip = {} if self.W_skip is None else {"W_skip": self.W_skip.detach().T}
        if layout == "sparsify":
            tensors = {"encoder.weight": sae.W_enc.T, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec,
                       "b_dec": sae.b_dec, **W_skip}
            cfg: JSONDict = {"activation": "topk", "k": sae.cfg.k, "num_latents": sae.cfg.d_sae, "d_in": sae.cfg.d_in,
                             "expansion_factor": max(1, sae.cfg.d_sae // sae.cfg.d_in), "normalize_decoder": True,
                             "multi_topk": False, "skip_connection": self.W_skip is not None, "transcode": True,
                             "interplab": ours, "metadata": {**(metadata or {})}}
            _write(path, SPARSIFY_WEIGHTS, tensors, cfg)
            return
        inference_arch = "relu" if arch == "relu" else "jumprelu"
        tensors = {name: getattr(sae, name) for name in ("W_enc", "W_dec", "b_enc", "b_dec")} | W_skip
        if arch != "relu":
            tensors["threshold"] = sae.threshold.detach().to(sae.b_enc.dtype).expand(sae.cfg.d_sae)
        meta: JSONDict = {"sae_lens_version": SAELENS_FORMAT_VERSION,
                          "sae_lens_training_version": SAELENS_FORMAT_VERSION, "hook_name": self.in_hook,
                          "hook_name_out": self.out_hook, "model_name": sae.cfg.model, **(metadata or {})}
        cfg = {"architecture": SAELENS_TRANSCODER_ARCH[inference_arch, self.W_skip is not None],
               "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "d_out": sae.cfg.d_in,
               "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "device": "cpu", "apply_b_dec_to_input": False,
               "normalize_activations": "none", "reshape_activations": "none", "metadata": meta, "interplab": ours}
        _write(path, SAELENS_WEIGHTS, tensors, cfg)


def _encoder_reads_x(sae: SparseAutoencoder) -> SparseAutoencoder:
    """`sae`, or a copy whose encoder reads x itself: (x − b_dec) W_enc + b_enc = x W_enc + (b_enc − b_dec W_enc)."""
    if not sae.cfg.subtract_b_dec:
        return sae
    folded = copy.deepcopy(sae)
    with torch.no_grad():
        folded.b_enc.sub_(folded.b_dec @ folded.W_enc)
    folded.cfg.apply_b_dec_to_input = False
    return folded


def _write(path: str, weights_name: str, tensors: Mapping[str, Tensor], cfg: JSONDict) -> None:
    """The weights (CPU, contiguous, detached), then cfg.json, each written atomically."""
    data = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    write_url_atomic(join(path, weights_name), data)
    write_url_atomic(join(path, CFG_FILE), json.dumps(cfg, indent=2).encode())


class TranscoderSet(NamedTuple):
    """One transcoder per layer, replacing every MLP (or the layers given) of a model."""

    transcoders: dict[int, Transcoder]
    """The transcoders by layer."""
    in_hook: str
    """The hook each reads, with {layer} for the layer, e.g. "blocks.{layer}.mlp.hook_in"."""
    out_hook: str
    """The hook each writes, with {layer}, e.g. "blocks.{layer}.hook_mlp_out"."""
