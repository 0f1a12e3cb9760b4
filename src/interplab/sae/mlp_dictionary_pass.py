"""An MLP dictionary (mlp_dictionary.py) through one forward pass, layer by layer, as a splice runs it: `read` each
covered layer's MLP input x_i in ascending order, then take ŷ_j once the layers it reads (`sources(j)`) have been
read. Only what later outputs still need is kept:

    per-layer     (f_j, x_j) from the read of layer j to its output (x_j: the skip term)
    cross-layer   running sums: reading layer i adds f_i @ W_dec[i][:, j − i] to the pending ŷ_j of every j ≥ i,
                  starting from b_dec[j] (the order and arithmetic of `CrossLayerTranscoder.decode_to`), so no
                  layer's features outlive its read

Arithmetic in float32 (a dictionary's does not follow a bf16 model): inputs are cast, and the dictionary is expected
in float32 (`MLPDictionary.float`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from jaxtyping import Float
from torch import Tensor

from interplab.errors import InterplabError
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.transcoder import Transcoder

__all__ = ["CrossLayerPass", "DictionaryPass", "PerLayerPass"]


class DictionaryPass(ABC):
    """Fresh state for one forward pass (`MLPDictionary.new_pass`)."""

    @abstractmethod
    def read(self, layer: int, x_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """f_layer from layer `layer`'s MLP input (float32)."""

    @abstractmethod
    def output(self, layer: int) -> Float[Tensor, "... d_model"]:
        """ŷ_layer (float32); once per layer."""


class PerLayerPass(DictionaryPass):
    """Keeps layer l's (f_l, x_l) from its read to its output."""

    def __init__(self, transcoders: Mapping[int, Transcoder]):
        self.transcoders = transcoders
        self.kept: dict[int, tuple[Tensor, Tensor]] = {}

    def read(self, layer: int, x_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        x = x_in.float()
        f = self.transcoders[layer].encode(x)
        self.kept[layer] = (f, x)
        return f

    def output(self, layer: int) -> Float[Tensor, "... d_model"]:
        if layer not in self.kept:
            raise InterplabError(f"the output of layer {layer} was asked before its input was read")
        f, x = self.kept.pop(layer)
        return self.transcoders[layer].decode(f, x)


class CrossLayerPass(DictionaryPass):
    """Running sums of the pending outputs ŷ_j, j ≥ the last layer read."""

    def __init__(self, clt: CrossLayerTranscoder):
        self.clt = clt
        self.pending: dict[int, Tensor] = {}
        self.next_read = 0

    def read(self, layer: int, x_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        if layer != self.next_read:  # a skipped layer would leave its features out of every later output
            raise InterplabError(f"a cross-layer transcoder reads its layers in order: got layer {layer}, expected "
                                 f"{self.next_read}")
        f = self.clt.encode(layer, x_in.float())
        for j in range(layer, self.clt.n_layers):
            self.pending[j] = self.pending.get(j, self.clt.b_dec[j]) + f @ self.clt.W_dec[layer][:, j - layer]
        self.next_read += 1
        return f

    def output(self, layer: int) -> Float[Tensor, "... d_model"]:
        if layer >= self.next_read or layer not in self.pending:
            raise InterplabError(f"the output of layer {layer} needs layers 0..{layer} read first (and once)")
        return self.pending.pop(layer)
