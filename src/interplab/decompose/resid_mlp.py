"""The residual MLP of "compressed computation" (Braun et al. 2025, APD; Bushnaq et al. 2025, SPD), as a
ground-truth model: 100 features computed by 50 neurons in all.

Data: x ∈ R^F (F = 100 features), each feature independently active with probability p = 0.01, with value
x_i ~ U[−1, 1] when active (0 otherwise). Labels: y_i = x_i + ReLU(x_i).

Model (no biases; the reference code's `ResidMLP` with a fixed random embedding):

    r_0 = x W_E                         W_E [F, d] fixed, rows random unit vectors e_i (d = 1000: the residual stream)
    r_l = r_{l−1} + W_out^l ReLU(W_in^l r_{l−1})     l = 1..L, W_in^l [m, d], W_out^l [d, m], m = 50 / L
    ŷ   = r_L W_Eᵀ                      the unembedding is the embedding's transpose, also fixed

trained on the mean over batch and features of (ŷ − y)² (AdamW, lr 3e-3, weight decay 0.01, cosine to 0, batch
2048, 1000 steps: the reference's schedule for 1 and 2 layers; not shortened, as `factored_forward` makes it cheap).

What the decomposition should find (SPD paper): W_in is a sum of one rank-1 mechanism per input feature. With the dual
rows d_i of D = (W_E W_Eᵀ)⁻¹ W_E (so that d_i · e_j = δ_ij, d_i ∈ span(W_E)), the mechanism of feature i is

    T_i = (W_in e_i) d_iᵀ,      Σ_i T_i = W_in P,      P = W_Eᵀ (W_E W_Eᵀ)⁻¹ W_E  (the projection onto span(W_E))

T_i maps e_i to W_in e_i and every other feature's direction to 0. For Σ_i T_i to equal W_in exactly, W_in must lie
in span(W_E) (W_in = W_in P); the trainer keeps it there by projecting after every step (and at initialisation). For
one layer this changes nothing the model can compute, since the residual stream never leaves span(W_E) before the
MLP; for two layers it stops layer 2 reading the part of layer 1's output outside span(W_E), which the reference
code allows: our one departure from it.

Baselines (`baseline_losses`, computed on the same samples): the identity-only model (MLPs off: ŷ = x W_E W_Eᵀ) and
the naive monosemantic model, which gives m of the features a neuron each (W_in row n = d_n, W_out column n = d_n,
so it adds ReLU(x_n) exactly for n < m) and leaves the others to the identity. Its loss beats the identity-only one
by (m / F) · p · E[ReLU(x)²] = (m / F) · p / 6; the paper's trained model beats it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from interplab.decompose.truth import GroundTruthModel, ToyRequest
from interplab.errors import InterplabError, check_int
from interplab.fileio import write_url_atomic


@dataclass(frozen=True)
class ResidMLPConfig:
    """The compressed-computation residual MLP and its training (defaults: the reference's 1-layer model)."""

    n_features: int = 100
    """F: input features (and outputs)."""
    d_embed: int = 1000
    """d: width of the residual stream."""
    d_mlp: int = 50
    """Neurons in all, split evenly over the layers (50 in the paper: 50 in one layer, or 25 + 25)."""
    n_layers: int = 1
    """MLP layers, each adding to the residual stream."""
    feature_prob: float = 0.01
    """p: probability that a feature is active in a sample."""
    steps: int = 1000
    """Training steps."""
    batch_size: int = 2048
    """Samples per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (cosine decay to 0)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    seed: int = 0
    """Seeds the embedding, the initialisation and the training data."""

    def validate(self) -> None:
        """Raise an InterplabError naming the first invalid field."""
        for name, minimum in (("n_features", 1), ("d_embed", 1), ("d_mlp", 1), ("n_layers", 1), ("steps", 0),
                              ("batch_size", 1), ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        if self.d_mlp % self.n_layers:
            raise InterplabError(f"d_mlp={self.d_mlp} must split evenly over n_layers={self.n_layers}")
        if self.n_features > self.d_embed:
            raise InterplabError(f"n_features={self.n_features} must be <= d_embed={self.d_embed} (W_E must have "
                                 "independent rows for the per-feature mechanisms to exist)")
        if not 0 < self.feature_prob <= 1:
            raise InterplabError(f"feature_prob must be in (0, 1], got {self.feature_prob}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise InterplabError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")


class MLP(nn.Module):
    """r ↦ W_out ReLU(W_in r), no biases."""

    def __init__(self, d_embed: int, d_mlp: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, r: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.mlp_out(F.relu(self.mlp_in(r)))


class ResidMLP(nn.Module):
    """Fixed embedding W_E (buffer), L residual MLP layers, unembedding W_Eᵀ (see the module docstring)."""

    def __init__(self, W_E: Float[Tensor, "F d"], n_layers: int, d_mlp_per_layer: int) -> None:
        super().__init__()
        self.register_buffer("W_E", W_E.clone())
        self.layers = nn.ModuleList(MLP(W_E.shape[1], d_mlp_per_layer) for _ in range(n_layers))

    def forward(self, x: Float[Tensor, "... F"]) -> Float[Tensor, "... F"]:
        r = x @ self.W_E
        for layer in self.layers:
            r = r + layer(r)
        return r @ self.W_E.T


def factored_forward(model: ResidMLP, x: Float[Tensor, "n F"]) -> Float[Tensor, "n F"]:
    """model(x) without ever forming a d-wide activation (what training uses: ~20x fewer FLOPs at d = 1000).

    The stream is kept as coefficients on row blocks, r = Σ_b c_b B_b with B_0 = W_E (c_0 = x) and B_l = W_out^lᵀ
    (c_l = layer l's ReLU output), so W_in r = Σ_b c_b (B_b W_inᵀ) and r W_Eᵀ = Σ_b c_b (B_b W_Eᵀ): only [·, F]- and
    [·, m]-wide products. Same function and gradients as `model(x)`, up to float rounding."""
    coeffs, blocks = [x], [model.W_E]
    for layer in model.layers:
        W_in, W_out = layer.mlp_in.weight, layer.mlp_out.weight                         # [m d], [d m]
        h = F.relu(sum(c @ (B @ W_in.T) for c, B in zip(coeffs, blocks)))
        coeffs.append(h)
        blocks.append(W_out.T)
    return sum(c @ (B @ model.W_E.T) for c, B in zip(coeffs, blocks))


def random_embedding(n_features: int, d_embed: int, gen: torch.Generator) -> Float[Tensor, "F d"]:
    """Rows: independent Gaussian vectors scaled to unit norm."""
    W = torch.randn(n_features, d_embed, generator=gen)
    return W / W.norm(dim=1, keepdim=True)


def dual_rows(W_E: Float[Tensor, "F d"]) -> Float[Tensor, "F d"]:
    """D = (W_E W_Eᵀ)⁻¹ W_E (float64 solve): rows in span(W_E) with D W_Eᵀ = I."""
    E = W_E.double()
    return torch.linalg.solve(E @ E.T, E).to(W_E.dtype)


def span_projection(W_E: Float[Tensor, "F d"]) -> Float[Tensor, "d d"]:
    """P = W_Eᵀ (W_E W_Eᵀ)⁻¹ W_E = W_Eᵀ D: the orthogonal projection onto span(W_E)'s rows."""
    return W_E.T @ dual_rows(W_E)


def sample_features(n: int, n_features: int, p: float, gen: torch.Generator) -> Float[Tensor, "n F"]:
    """Each feature active with probability p, then U[−1, 1]; inactive features are 0."""
    active = torch.rand(n, n_features, generator=gen, device=gen.device) < p
    return (2 * torch.rand(n, n_features, generator=gen, device=gen.device) - 1) * active


def labels(x: Float[Tensor, "n F"]) -> Float[Tensor, "n F"]:
    """y = x + ReLU(x)."""
    return x + F.relu(x)


def cosine_lr(step: int, steps: int, lr: float) -> float:
    """lr · ½ (1 + cos(π step / steps)): from lr at step 0 to 0 at the end."""
    return lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))


def build(cfg: ResidMLPConfig) -> ResidMLP:
    """The untrained model of `cfg`: its embedding and initial weights from cfg.seed, W_in inside span(W_E)."""
    cfg.validate()
    gen = torch.Generator().manual_seed(cfg.seed)
    W_E = random_embedding(cfg.n_features, cfg.d_embed, gen)
    torch.manual_seed(cfg.seed)  # nn.Linear's default initialisation reads the global generator
    model = ResidMLP(W_E, cfg.n_layers, cfg.d_mlp // cfg.n_layers)
    _project_inputs(model, span_projection(W_E))
    return model


@torch.no_grad()
def _project_inputs(model: ResidMLP, P: Float[Tensor, "d d"]) -> None:
    """W_in ← W_in P for every layer: the MLPs read the stream only through span(W_E)."""
    for layer in model.layers:
        layer.mlp_in.weight.copy_(layer.mlp_in.weight @ P)


def train_resid_mlp(cfg: ResidMLPConfig, *, progress: bool = True, device: str = "cpu") -> ResidMLP:
    """Train the model of `cfg` (seeded: the same cfg gives the same weights on the same device and threads)."""
    model = build(cfg).to(device)
    P = span_projection(model.W_E)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    for step in tqdm(range(cfg.steps), desc=f"resid-mlp-{cfg.n_layers} target", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
        x = sample_features(cfg.batch_size, cfg.n_features, cfg.feature_prob, gen)
        loss = (factored_forward(model, x) - labels(x)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _project_inputs(model, P)  # Adam's per-coordinate steps leave the span; bring W_in back
    return model.eval()


class Losses(NamedTuple):
    """Mean squared error over samples and features, all on the same samples."""

    model: float
    """The trained model."""
    identity: float
    """MLPs off: ŷ = x W_E W_Eᵀ."""
    monosemantic: float
    """The naive solution: ReLU(x_i) added exactly for the first d_mlp features, identity for the rest."""


@torch.no_grad()
def baseline_losses(model: ResidMLP, x: Float[Tensor, "n F"]) -> Losses:
    """The model's loss beside the identity-only and monosemantic baselines on samples x."""
    y = labels(x)
    identity = x @ model.W_E @ model.W_E.T
    m = sum(layer.mlp_in.out_features for layer in model.layers)
    mono = identity + F.relu(x) * (torch.arange(x.shape[1], device=x.device) < m)

    def mse(y_hat: Tensor) -> float:
        return float((y_hat - y).pow(2).mean())

    return Losses(mse(model(x)), mse(identity), mse(mono))


@dataclass
class ResidMLPTruth:
    """The trained residual MLP as a GroundTruthModel: its W_in matrices with one mechanism per feature."""

    name: str
    """"resid-mlp-1" or "resid-mlp-2"."""
    model: ResidMLP
    """The trained model."""
    cfg: ResidMLPConfig
    """How it was built and trained."""

    targets: list[str] = field(default_factory=list)
    """The layers to decompose; empty (the default) means every layer's W_in: layers.0.mlp_in, ..."""

    def __post_init__(self) -> None:
        if not self.targets:
            self.targets = [f"layers.{i}.mlp_in" for i in range(len(self.model.layers))]

    def sample(self, batch: int, gen: torch.Generator) -> Float[Tensor, "batch F"]:
        """Inputs from the training distribution."""
        return sample_features(batch, self.cfg.n_features, self.cfg.feature_prob, gen)

    @torch.no_grad()
    def true_components(self) -> dict[str, Float[Tensor, "F m d"]]:
        """Per layer: T_i = (W_in e_i) d_iᵀ for each feature i; Σ_i T_i = W_in (W_in stays inside span(W_E))."""
        W_E = self.model.W_E
        D = dual_rows(W_E)
        out = {}
        for i in range(len(self.model.layers)):
            name = f"layers.{i}.mlp_in"
            W_in = self.model.get_submodule(name).weight                  # [m d]
            out[name] = torch.einsum("mi,id->imd", W_in @ W_E.T, D)     # [F m d]
        return out

    def one_hot_inputs(self) -> Float[Tensor, "F F"]:
        """Each feature alone at value 1 (the top of its range; at negative values ReLU hides the MLP's work)."""
        return torch.eye(self.cfg.n_features, device=self.model.W_E.device)


def load_or_train(cfg: ResidMLPConfig, cache: Path | None, device: str, progress: bool) -> ResidMLP:
    """The trained model of cfg, from cache/ if it holds this cfg's weights, else trained (and saved there)."""
    cfg.validate()
    if cache is not None and (cache / "resid_mlp.json").is_file():
        saved = json.loads((cache / "resid_mlp.json").read_text())
        if saved == asdict(cfg) and (cache / "resid_mlp.safetensors").is_file():
            model = build(cfg).to(device)
            model.load_state_dict(load_file(str(cache / "resid_mlp.safetensors"), device=device))
            return model.eval()
    model = train_resid_mlp(cfg, progress=progress, device=device)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / "resid_mlp.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(cache / "resid_mlp.safetensors")    # weights first, then the json that vouches for them
        write_url_atomic(str(cache / "resid_mlp.json"), json.dumps(asdict(cfg)).encode())
    return model


def resid_mlp_factory(n_layers: int) -> Callable[[ToyRequest], GroundTruthModel]:
    """The registry entry for "resid-mlp-{n_layers}": 50 neurons in all, the reference schedule."""
    def factory(req: ToyRequest) -> GroundTruthModel:
        cfg = ResidMLPConfig(n_layers=n_layers, seed=req.seed)
        model = load_or_train(cfg, req.cache, req.device, req.progress)
        return ResidMLPTruth(f"resid-mlp-{n_layers}", model, cfg)
    return factory
