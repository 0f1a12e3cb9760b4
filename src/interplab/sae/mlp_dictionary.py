"""An MLP dictionary: one transcoder per layer, or one cross-layer transcoder (CLT), behind one interface, so that
what splices it in place of the MLPs (evals/replacement.py, evals/transcoder_eval.py) and the attribution graphs
(graphs/: replacement model, edges, interventions, control) are written once for both.

Feature f of layer i reads x_i = `blocks.{i}.mlp.hook_in` (f_i = enc_i(x_i)) and writes

    per-layer:    a · W_dec[i][f]                into MLP output i only (plus the skip term x_i @ W_skip[i]),
    cross-layer:  a · W_dec[i][f, j − i]         into every MLP output j ≥ i,

so that MLP output j, y_j = `blocks.{j}.hook_mlp_out`, is predicted from the features of its source layers:

    ŷ_j = Σ_{i ∈ sources(j)} f_i @ W_dec[i][:, j − i] + b_dec[j] (+ x_j @ W_skip[j])

with sources(j) = {j} per layer and {0, ..., j} for a CLT. A per-layer set is the CLT whose cross-layer decoders are
zero: `decoder_rows` returns the per-layer decoder with one output layer, and the code above treats both alike.

Two ways to run it: on whole tensors (`encode` a layer; `output` of a layer from its sources' activations; the read
and write vectors of given features; `skip`), or streaming through one forward pass (`new_pass`,
mlp_dictionary_pass.py). `check` refuses, before any forward pass, a dictionary that does not map each layer's MLP
input to its output at the model's width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import yaml
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError
from interplab.fileio import join, list_files, open_url
from interplab.models.hooked import HookedModel
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.crosslayer_config import IN_HOOK, OUT_HOOK
from interplab.sae.mlp_dictionary_pass import CrossLayerPass, DictionaryPass, PerLayerPass
from interplab.sae.transcoder import Transcoder, TranscoderSet

__all__ = ["IN_HOOK", "OUT_HOOK", "CrossLayer", "Dictionary", "DictionaryPass", "DictionarySource", "MLPDictionary",
           "PerLayer", "Transcoders", "as_dictionary", "as_layers", "check_transcoders", "clt_model_name", "mlp_in",
           "mlp_out"]

Transcoders = Mapping[int, Transcoder]
"""One transcoder per layer, by layer (`TranscoderSet.transcoders`)."""
Dictionary = Transcoders | CrossLayerTranscoder
"""Per-layer transcoders or one cross-layer transcoder (what the graph functions take)."""
CONFIG_FILE = "config.yaml"
"""circuit-tracer's config file, which records the CLT's model (`model_name`)."""


def mlp_in(layer: int) -> str:
    return IN_HOOK.format(layer=layer)


def mlp_out(layer: int) -> str:
    return OUT_HOOK.format(layer=layer)


class MLPDictionary(ABC):
    """Features of each covered layer from its MLP input, and each covered layer's predicted MLP output."""

    kind: str
    """"per_layer" or "crosslayer" (recorded in metrics.json as "dictionary")."""
    layers: list[int]
    """The layers whose MLP output it replaces, ascending."""
    model_name: str
    """The model it was trained on, as recorded with it ("" if unknown)."""

    @property
    def n_layers(self) -> int:
        """How many layers it covers (the model's, once `check(model, every_layer=True)` has passed)."""
        return len(self.layers)

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def check(self, model: HookedModel, *, every_layer: bool = False) -> None:
        """One-line InterplabError unless layer l's part reads `blocks.{l}.mlp.hook_in` and writes
        `blocks.{l}.hook_mlp_out` of `model`, at width d_model, for layers of the model (all of them with
        `every_layer`; a CLT always covers every layer). Before any forward pass."""

    @abstractmethod
    def sources(self, layer: int) -> list[int]:
        """The layers whose features ŷ_layer reads, ascending."""

    @abstractmethod
    def d_sae(self, layer: int) -> int: ...

    @abstractmethod
    def describe(self, layer: int) -> dict[str, str | int | bool]:
        """in_hook, out_hook, arch, d_sae and skip of layer `layer`, for the report."""

    @abstractmethod
    def to(self, device: torch.device | str) -> MLPDictionary:
        """Moved to `device` (in place)."""

    @abstractmethod
    def float(self) -> MLPDictionary:
        """In float32 and eval mode (in place), as a splice into a model of any dtype computes it."""

    @abstractmethod
    def new_pass(self) -> DictionaryPass:
        """Fresh state for one forward pass (float32 arithmetic)."""

    @abstractmethod
    def encode(self, layer: int, x_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Layer `layer`'s feature activations from its MLP input."""

    @abstractmethod
    def output(self, layer: int, acts: Mapping[int, Tensor], x_in: Float[Tensor, "... d_model"]
               ) -> Float[Tensor, "... d_model"]:
        """ŷ_layer from the activations of its source layers (`acts[i]`) and this layer's MLP input (skip)."""

    @abstractmethod
    def encoder_rows(self, layer: int, idx: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
        """∂pre_f/∂x_in for the features `idx` of layer `layer` (the encoder columns)."""

    @abstractmethod
    def decoder_rows(self, layer: int, idx: Int[Tensor, " n"]) -> Float[Tensor, "n n_out d_model"]:
        """What one unit of each feature writes into MLP outputs layer, layer + 1, ..., layer + n_out − 1."""

    def skip(self, layer: int) -> Float[Tensor, "d_model d_model"] | None:
        """W_skip of layer `layer` (ŷ += x_in @ W_skip), or None."""
        return None


DictionarySource = Dictionary | TranscoderSet | Transcoder | MLPDictionary
"""What `as_dictionary` wraps."""


def _check_fit(model: HookedModel, what: str, maps: tuple[str, str], want: tuple[str, str], width: int,
               hooks: list[str]) -> None:
    """The one set of messages: `what` maps `maps` (hook names or templates) but must map `want`, and has `width`."""
    if maps != want:
        raise InterplabError(f"{what} maps {maps[0]} → {maps[1]}; a transcoder replaces an MLP, reading the MLP's "
                             f"input and output {want[0]} → {want[1]}")
    model.check_hook_names(hooks)
    if width != model.info.d_model:
        raise InterplabError(f"{what} has width {width}, {model.info.spec} has d_model {model.info.d_model}")


class PerLayer(MLPDictionary):
    """One `Transcoder` per covered layer: ŷ_l = T_l(x_l) reads layer l's features only."""

    kind = "per_layer"

    def __init__(self, transcoders: Transcoders | TranscoderSet | Transcoder):
        self.transcoders = as_layers(transcoders)
        self.layers = list(self.transcoders)
        first = self._first()
        self.model_name = first.sae.cfg.model if first is not None else ""

    def _first(self) -> Transcoder | None:
        return next(iter(self.transcoders.values()), None)

    @property
    def dtype(self) -> torch.dtype:
        first = self._first()
        return first.sae.W_enc.dtype if first is not None else torch.float32

    @property
    def device(self) -> torch.device:
        first = self._first()
        return first.device if first is not None else torch.device("cpu")

    def check(self, model: HookedModel, *, every_layer: bool = False) -> None:
        n, spec = model.info.n_layers, model.info.spec
        if every_layer and self.layers != list(range(n)):
            raise InterplabError(f"need one transcoder per layer 0..{n - 1} of {spec}, got layers {self.layers}")
        if not self.layers:
            raise InterplabError("no transcoder given")
        for layer, tc in self.transcoders.items():
            if not 0 <= layer < n:
                raise InterplabError(f"a transcoder of layer {layer} does not fit {spec}, which has layers "
                                     f"0..{n - 1}")
            want = (mlp_in(layer), mlp_out(layer))
            _check_fit(model, f"the transcoder of layer {layer}", (tc.in_hook, tc.out_hook), want, tc.sae.cfg.d_in,
                       list(want))

    def sources(self, layer: int) -> list[int]:
        return [layer]

    def d_sae(self, layer: int) -> int:
        return self.transcoders[layer].sae.cfg.d_sae

    def describe(self, layer: int) -> dict[str, str | int | bool]:
        tc = self.transcoders[layer]
        return {"in_hook": tc.in_hook, "out_hook": tc.out_hook, "arch": tc.sae.cfg.arch, "d_sae": tc.sae.cfg.d_sae,
                "skip": tc.W_skip is not None}

    def to(self, device: torch.device | str) -> PerLayer:
        for tc in self.transcoders.values():
            tc.to(device)
        return self

    def float(self) -> PerLayer:
        for tc in self.transcoders.values():
            tc.float().eval()
        return self

    def new_pass(self) -> DictionaryPass:
        return PerLayerPass(self.transcoders)

    def encode(self, layer: int, x_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        return self.transcoders[layer].encode(x_in)

    def output(self, layer: int, acts: Mapping[int, Tensor], x_in: Float[Tensor, "... d_model"]
               ) -> Float[Tensor, "... d_model"]:
        return self.transcoders[layer].decode(acts[layer], x_in)

    def encoder_rows(self, layer: int, idx: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
        return self.transcoders[layer].sae.W_enc[:, idx].T

    def decoder_rows(self, layer: int, idx: Int[Tensor, " n"]) -> Float[Tensor, "n n_out d_model"]:
        return self.transcoders[layer].sae.W_dec[idx][:, None]

    def skip(self, layer: int) -> Float[Tensor, "d_model d_model"] | None:
        return self.transcoders[layer].W_skip


class CrossLayer(MLPDictionary):
    """One `CrossLayerTranscoder`: covers every layer; ŷ_j reads the features of layers 0..j."""

    kind = "crosslayer"

    def __init__(self, clt: CrossLayerTranscoder, model_name: str = ""):
        self.clt = clt
        self.layers = list(range(clt.n_layers))
        self.model_name = model_name

    @property
    def dtype(self) -> torch.dtype:
        return self.clt.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.clt.device

    def check(self, model: HookedModel, *, every_layer: bool = False) -> None:
        clt, n = self.clt, model.info.n_layers
        if clt.n_layers != n:
            raise InterplabError(f"the cross-layer transcoder has {clt.n_layers} layers, {model.info.spec} has {n}; "
                                 "a CLT must cover every layer of its model")
        _check_fit(model, "the cross-layer transcoder", (clt.in_hook, clt.out_hook), (IN_HOOK, OUT_HOOK),
                   clt.d_model, [h(l) for l in self.layers for h in (mlp_in, mlp_out)])

    def sources(self, layer: int) -> list[int]:
        return list(range(layer + 1))

    def d_sae(self, layer: int) -> int:
        return self.clt.d_sae

    def describe(self, layer: int) -> dict[str, str | int | bool]:
        return {"in_hook": self.clt.in_hook_at(layer), "out_hook": self.clt.out_hook_at(layer),
                "arch": self.clt.activation, "d_sae": self.clt.d_sae, "skip": False}

    def to(self, device: torch.device | str) -> CrossLayer:
        self.clt.to(device)
        return self

    def float(self) -> CrossLayer:
        self.clt.float().eval()
        return self

    def new_pass(self) -> DictionaryPass:
        return CrossLayerPass(self.clt)

    def encode(self, layer: int, x_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        return self.clt.encode(layer, x_in)

    def output(self, layer: int, acts: Mapping[int, Tensor], x_in: Float[Tensor, "... d_model"]
               ) -> Float[Tensor, "... d_model"]:
        return self.clt.decode_to(layer, {i: a for i, a in acts.items() if i <= layer})

    def encoder_rows(self, layer: int, idx: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
        return self.clt.W_enc[layer][:, idx].T

    def decoder_rows(self, layer: int, idx: Int[Tensor, " n"]) -> Float[Tensor, "n n_out d_model"]:
        return self.clt.W_dec[layer][idx]


def as_layers(transcoders: Transcoders | TranscoderSet | Transcoder) -> dict[int, Transcoder]:
    """{layer: transcoder}, ascending, from a `TranscoderSet`, a dict by layer or a single transcoder."""
    if isinstance(transcoders, Transcoder):
        return {transcoders.layer: transcoders}
    by_layer = transcoders.transcoders if isinstance(transcoders, TranscoderSet) else transcoders
    if not isinstance(by_layer, Mapping) or not all(isinstance(t, Transcoder) for t in by_layer.values()):
        raise InterplabError(f"expected a CrossLayerTranscoder, a Transcoder, a TranscoderSet or a dict of "
                             f"Transcoders by layer, got {type(transcoders).__name__}")
    return dict(sorted(by_layer.items()))


def as_dictionary(dictionary: DictionarySource, model_name: str = "") -> MLPDictionary:
    """Wrap a `CrossLayerTranscoder` or per-layer transcoders (a `TranscoderSet`, a dict by layer, one
    `Transcoder`); an already wrapped one is returned as it is. `model_name` is recorded with a CLT (its object does
    not carry one; per-layer transcoders carry theirs)."""
    if isinstance(dictionary, MLPDictionary):
        return dictionary
    if isinstance(dictionary, CrossLayerTranscoder):
        return CrossLayer(dictionary, model_name)
    return PerLayer(dictionary)


def check_transcoders(model: HookedModel, dictionary: DictionarySource) -> None:
    """One-line InterplabError unless the dictionary covers every layer's MLP, input to output, at d_model."""
    as_dictionary(dictionary).check(model, every_layer=True)


def clt_model_name(path: str) -> str:
    """The `model_name` a circuit-tracer CLT folder records in config.yaml ("" if none)."""
    fs, root = open_url(path)
    if CONFIG_FILE not in list_files(fs, root):
        return ""
    config: Any = yaml.safe_load(fs.cat_file(join(root, CONFIG_FILE)).decode("utf-8"))
    name = config.get("model_name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else ""
