"""The toy models of superposition SPD and APD were first checked on: TMS 5-2, 40-10, and both with an identity.

    x̂ = ReLU(Wᵀ W x + b)          (TMS n-m: W [m, n], n features in m hidden dimensions)
    x̂ = ReLU(Wᵀ I W x + b)        (+ID: a fixed m×m identity between the two halves)

Inputs: each feature independently present with probability 0.05, then uniform on [0, 1] (`synth.tms.sample_features`).
The weights are tied while training (one W), as in Elhage et al. and the SPD paper; the trained model is then held as
three separate `nn.Linear`s, `linear1` (W), `hidden_layers.0` (I, +ID only) and `linear2` (Wᵀ, with b), which is
what SPD decomposes (each one separately, as the reference configs do).

True mechanisms (Braun et al. 2025, §3.1): feature i uses only column i of W, so linear1 = Σᵢ W[:, i] eᵢᵀ and
linear2 = Σᵢ eᵢ W[:, i]ᵀ, n rank-1 pieces each; the identity is one rank-m mechanism used on every input (SPD should
split it into m subcomponents that are always on together).

Training follows the SPD paper's target models (AdamW, weight decay 0.01, constant lr 5e-3, 10k steps, batch 1024 for
5-2 and 8192 for 40-10) on a shortened CPU schedule: 5000 steps of 1024 (5-2) or 2048 (40-10), as the APD paper
trained its 40-10 model (2k steps of 2048). The trained model is cached in the run folder (target.pt).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from interplab.decompose.truth import GroundTruthModel, ToyRequest
from interplab.fileio import write_url_atomic
from interplab.synth.tms import sample_features

FEATURE_PROBABILITY = 0.05
"""Probability that a feature is present (then uniform on [0, 1])."""
ONE_HOT_VALUE = 0.75
"""The value of the one feature that is on in `one_hot_inputs` (inside the range the model was trained on)."""
TARGET_FILE = "target.pt"


class TMSModel(nn.Module):
    """ReLU(linear2(hidden(linear1(x)))): the TMS forward with separate, frozen layers (see the module docstring)."""

    def __init__(self, W: Float[Tensor, "m n"], b: Float[Tensor, " n"], identity: bool) -> None:
        super().__init__()
        m, n = W.shape
        self.linear1 = nn.Linear(n, m, bias=False)
        self.linear2 = nn.Linear(m, n, bias=True)
        self.hidden_layers = nn.ModuleList([nn.Linear(m, m, bias=False)] if identity else [])
        with torch.no_grad():
            self.linear1.weight.copy_(W)
            self.linear2.weight.copy_(W.T)
            self.linear2.bias.copy_(b)
            for layer in self.hidden_layers:
                layer.weight.copy_(torch.eye(m))
        self.requires_grad_(False)

    def forward(self, x: Float[Tensor, "batch n"]) -> Float[Tensor, "batch n"]:
        h = self.linear1(x)
        for layer in self.hidden_layers:
            h = layer(h)
        return torch.relu(self.linear2(h))


@dataclass
class TMSTruth:
    """A trained TMS model as a `GroundTruthModel`."""

    name: str
    model: TMSModel
    targets: list[str]
    feature_probability: float = FEATURE_PROBABILITY
    output_loss: str = "mse"

    @property
    def n_features(self) -> int:
        return self.model.linear1.in_features

    def sample(self, batch: int, gen: torch.Generator) -> Float[Tensor, "batch n"]:
        """Each feature present with probability 0.05, then uniform on [0, 1]."""
        prob = torch.full((1, 1, 1), self.feature_probability, device=gen.device)
        return sample_features(prob, batch, self.n_features, gen)[0]

    def true_components(self) -> dict[str, Float[Tensor, "n_true d_out d_in"]]:
        """linear1: W[:, i] eᵢᵀ; linear2: eᵢ W[:, i]ᵀ (one per feature); hidden identity: the whole I."""
        W = self.model.linear1.weight.detach()
        eye = torch.eye(self.n_features, device=W.device)
        truth = {"linear1": torch.einsum("ai,ij->iaj", W, eye),   # [n, m, n]: T_i = column i of W, nothing else
                 "linear2": torch.einsum("ij,ai->ija", eye, W)}   # [n, n, m]: T_i = row i of Wᵀ
        for k, layer in enumerate(self.model.hidden_layers):
            truth[f"hidden_layers.{k}"] = layer.weight.detach()[None].clone()
        return {name: truth[name] for name in self.targets}

    def one_hot_inputs(self) -> Float[Tensor, "n n"]:
        """Feature i alone at 0.75, for each i."""
        return torch.eye(self.n_features, device=self.model.linear1.weight.device) * ONE_HOT_VALUE


def train_tms_weights(n: int, m: int, identity: bool, seed: int, *, steps: int, batch_size: int,
                      lr: float = 5e-3, weight_decay: float = 0.01, device: str = "cpu",
                      progress: bool = True) -> tuple[Tensor, Tensor]:
    """Train the tied TMS model: minimise mean_(batch, i) (xᵢ − x̂ᵢ)² with AdamW (constant lr); return (W, b).

    W starts Xavier-normal, b at 0. The identity (+ID) is fixed, so it changes nothing in training but its
    presence in the forward (x̂ = ReLU(Wᵀ I W x + b) = ReLU(WᵀW x + b))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    W = (torch.randn(m, n, generator=gen, device=device) * math.sqrt(2.0 / (m + n))).requires_grad_()
    b = torch.zeros(n, device=device, requires_grad=True)
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=weight_decay)
    prob = torch.full((1, 1, 1), FEATURE_PROBABILITY, device=device)
    eye = torch.eye(m, device=device)
    for _ in tqdm(range(steps), desc=f"train tms {n}-{m}" + ("-id" if identity else ""), disable=not progress):
        x = sample_features(prob, batch_size, n, gen)[0]
        h = x @ W.T
        out = torch.relu((h @ eye if identity else h) @ W + b)
        loss = (out - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return W.detach(), b.detach()


def tms_factory(n: int, m: int, identity: bool, steps: int = 5000,
                batch_size: int | None = None) -> Callable[[ToyRequest], GroundTruthModel]:
    """The registry factory of TMS n-m (+ID): train (or load from the cache) and wrap as a `TMSTruth`."""
    name = f"tms-{n}-{m}" + ("-id" if identity else "")
    batch = batch_size or (1024 if n <= 5 else 2048)
    targets = ["linear1", *(["hidden_layers.0"] if identity else []), "linear2"]

    def build(request: ToyRequest) -> GroundTruthModel:
        meta = {"name": name, "seed": request.seed, "steps": steps, "batch_size": batch}
        cached = _load_cached(request.cache, meta, request.device)
        if cached is None:
            W, b = train_tms_weights(n, m, identity, request.seed, steps=steps, batch_size=batch,
                                     device=request.device, progress=request.progress)
            if request.cache is not None:
                _save_cached(request.cache, meta, W, b)
        else:
            W, b = cached
        return TMSTruth(name=name, model=TMSModel(W, b, identity).to(request.device), targets=list(targets))

    return build


def random_tms_like(truth: TMSTruth, seed: int) -> TMSTruth:
    """The control: a TMS of the same shape with freshly initialised, untrained weights (W Xavier-normal, b = 0)."""
    W0 = truth.model.linear1.weight
    m, n = W0.shape
    gen = torch.Generator(device=W0.device).manual_seed(seed)
    W = torch.randn(m, n, generator=gen, device=W0.device) * math.sqrt(2.0 / (m + n))
    identity = len(truth.model.hidden_layers) > 0
    return TMSTruth(name=truth.name + "-random", model=TMSModel(W, torch.zeros(n, device=W0.device), identity),
                    targets=list(truth.targets))


def _load_cached(cache: Path | None, meta: dict[str, object], device: str) -> tuple[Tensor, Tensor] | None:
    """(W, b) saved for exactly these settings, or None."""
    if cache is None or not (cache / TARGET_FILE).is_file():
        return None
    saved = torch.load(cache / TARGET_FILE, map_location=device, weights_only=True)
    if saved.get("meta") != meta:
        return None
    return saved["W"], saved["b"]


def _save_cached(cache: Path, meta: dict[str, object], W: Tensor, b: Tensor) -> None:
    buf = io.BytesIO()
    torch.save({"meta": meta, "W": W.cpu(), "b": b.cpu()}, buf)
    write_url_atomic(str(cache / TARGET_FILE), buf.getvalue())
