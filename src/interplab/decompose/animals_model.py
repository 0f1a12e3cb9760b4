"""A small model whose computation reads the animals: "animals-facts", a ground-truth model for SPD vs SAEs.

Input: samples x of the animals generator (interplab.synth.animals, dense default: generic unit animal directions
a_j inside a K-dim attribute span, animals active sparsely, attribute values dense). Each animal j has a fact
f_j ∈ R^n_facts (a fixed random Gaussian vector / √n_facts, e.g. "where it lives, what it eats"), and the model is
trained to output the facts of the animals present, weighted by their coefficients:

    y = Σ_j c_j f_j                                         (c: the animal coefficients of x)
    ŷ = W_fact ReLU(W_detect x + b_detect) + b_fact         detect: nn.Linear(d, A), fact: nn.Linear(A, n_facts)

With A > K animals in a K-dim span no linear map does this (W a_j = f_j for all j asks a rank ≤ K matrix to match
A generic vectors; `AnimalsFactsLosses.linear` is the best one), so the model has to detect each animal: neuron j
is animal j's detector, row j of W_detect = a_j (fixed), with a threshold (bias, initially −`threshold`: animals are
nearly orthogonal, so another animal moves a_j · x by only ~1/√K); the thresholds and the readout W_fact, b_fact are
trained (AdamW, MSE). The detector rows are not trained: trained, they drift inside the span toward directions that
cancel the crosstalk (mean cos(W_detect[j], a_j) 0.79 after 500 steps) and some neurons then fire on a second animal,
which blurs the one-mechanism-per-animal truth. The true mechanisms are, per animal j,

    detect:  T_j = e_j W_detect[j]ᵀ   (row j: reads animal j)       Σ_j T_j = W_detect exactly
    fact:    T_j = W_fact[:, j] e_jᵀ  (column j: writes its fact)    Σ_j T_j = W_fact exactly

Each is needed only when animal j is present (its neuron is below threshold otherwise), so a parameter decomposition
that looks for mechanisms used as rarely as possible should find one per animal; a dictionary of the input x may
prefer the K attribute directions, which reconstruct x with fewer dictionary rows (see the synth bench).

Sizes (defaults): A = 200 animals in a K = 50 attribute span (the issue's 1/√50 spread) of d = 64, 2 animals active
per sample on average, no independent features, 16 facts: small enough for SPD with C ≥ A on a CPU in minutes.
"""

from __future__ import annotations

import json
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

from interplab.decompose.resid_mlp import cosine_lr
from interplab.decompose.truth import GroundTruthModel, ToyRequest
from interplab.errors import InterplabError, check_int
from interplab.fileio import write_url_atomic
from interplab.synth.animals import Animals, AnimalsConfig
from interplab.synth.sparse import derive_seed

_FACTS, _INIT, _DATA = 11, 12, 13  # derive_seed keys of the facts, the initialisation and the training stream


@dataclass(frozen=True)
class AnimalsFactsConfig:
    """The animals generator the model reads and how the model is trained."""

    n_animals: int = 200
    """A: animals (and hidden neurons)."""
    n_attributes: int = 50
    """K: dimension of the attribute span the animals live in."""
    d: int = 64
    """Dimension of x."""
    animal_mean_active: float = 2.0
    """Expected number of animals present per sample."""
    n_facts: int = 16
    """Width of each animal's fact vector (the model's output)."""
    threshold: float = 0.2
    """Initial detector threshold (−b_detect): above the ~1/√K crosstalk of the other animals present."""
    steps: int = 1000
    """Training steps."""
    batch_size: int = 1024
    """Samples per step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (cosine decay to 0)."""
    seed: int = 0
    """Seeds the generator (its directions and stream), the facts and the initialisation."""

    def validate(self) -> None:
        """Raise an InterplabError naming the first invalid field (the generator checks its own fields)."""
        for name, minimum in (("n_facts", 1), ("steps", 0), ("batch_size", 1), ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        if not (self.threshold >= 0 and self.lr > 0):
            raise InterplabError(f"threshold must be >= 0 and lr > 0, got {self.threshold} and {self.lr}")
        self.generator_config().validate()

    def generator_config(self) -> AnimalsConfig:
        """The animals generator (dense membership, no independent features) the model reads."""
        return AnimalsConfig(n_animals=self.n_animals, n_attributes=self.n_attributes, n_independent=0, d=self.d,
                             animal_mean_active=self.animal_mean_active, membership="dense", seed=self.seed)


class AnimalsFacts(nn.Module):
    """ŷ = fact(ReLU(detect(x)))."""

    def __init__(self, d: int, n_animals: int, n_facts: int) -> None:
        super().__init__()
        self.detect = nn.Linear(d, n_animals)
        self.fact = nn.Linear(n_animals, n_facts)

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... n_facts"]:
        return self.fact(F.relu(self.detect(x)))


def facts(cfg: AnimalsFactsConfig) -> Float[Tensor, "A n_facts"]:
    """The fixed random fact of every animal: Gaussian / √n_facts (unit norm on average)."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, _FACTS))
    return torch.randn(cfg.n_animals, cfg.n_facts, generator=g) / cfg.n_facts ** 0.5


def build(cfg: AnimalsFactsConfig, gen: Animals) -> AnimalsFacts:
    """The untrained model: neuron j = animal j's detector (row a_j, bias −threshold), readout from torch's init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, _INIT))
        model = AnimalsFacts(cfg.d, cfg.n_animals, cfg.n_facts)
    with torch.no_grad():
        model.detect.weight.copy_(gen.animal_directions)
        model.detect.bias.fill_(-cfg.threshold)
    return model


def train_animals_facts(cfg: AnimalsFactsConfig, *, progress: bool = True, device: str = "cpu") -> AnimalsFacts:
    """Train the thresholds and the readout on y = c F with MSE (seeded: same cfg, same weights on the same device
    and threads)."""
    cfg.validate()
    gen, F_true = Animals(cfg.generator_config()), facts(cfg).to(device)
    model = build(cfg, gen).to(device)
    # The detectors' weights stay the animal directions (see the module docstring); their thresholds are trained.
    model.detect.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    stream = torch.Generator(device).manual_seed(derive_seed(cfg.seed, _DATA))
    for step in tqdm(range(cfg.steps), desc="animals-facts target", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
        b = gen.sample(cfg.batch_size, stream)
        loss = (model(b.x) - b.animal_coeffs @ F_true).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


class AnimalsFactsLosses(NamedTuple):
    """Mean squared error over samples and fact coordinates, all on the same held-out samples."""

    model: float
    """The trained model."""
    linear: float
    """The best affine map x -> y (least squares on these very samples: a lower bound for any linear model)."""
    zero: float
    """Predicting 0 (the mean of y is ~0: facts are zero-mean)."""


@dataclass
class AnimalsFactsTruth:
    """The trained model as a GroundTruthModel: one rank-1 mechanism per animal in each layer."""

    model: AnimalsFacts
    """The trained model."""
    cfg: AnimalsFactsConfig
    """How it was built and trained."""
    name: str = "animals-facts"
    """Registry name."""

    targets: list[str] = field(default_factory=lambda: ["detect", "fact"])
    """The layers to decompose (default both: the detectors and the fact readout; assignable, as --layers does)."""

    def __post_init__(self) -> None:
        self.generator = Animals(self.cfg.generator_config())
        self.facts = facts(self.cfg)

    def sample(self, batch: int, gen: torch.Generator) -> Float[Tensor, "batch d"]:
        """Generator samples x (its truth is dropped; use `self.generator.sample` for it)."""
        return self.generator.sample(batch, gen).x

    @torch.no_grad()
    def true_components(self) -> dict[str, Float[Tensor, "A d_out d_in"]]:
        """detect: row j as e_j W[j]ᵀ; fact: column j as W[:, j] e_jᵀ (each summing to its weight exactly)."""
        Wd, Wf = self.model.detect.weight, self.model.fact.weight                  # [A d], [n_facts A]
        eye = torch.eye(Wd.shape[0], device=Wd.device)
        return {"detect": eye[:, :, None] * Wd[:, None, :],                          # [A A d]
                "fact": Wf.T[:, :, None] * eye[:, None, :]}                           # [A n_facts A]

    def one_hot_inputs(self) -> Float[Tensor, "A d"]:
        """Each animal alone at coefficient 1: x = a_j."""
        return self.generator.animal_directions.to(self.model.detect.weight.device)

    @torch.no_grad()
    def selectivity(self) -> Float[Tensor, "A A"]:
        """Hidden activations [animal, neuron] with each animal alone at coefficient 1 (diagonal: its own neuron)."""
        return F.relu(self.model.detect(self.one_hot_inputs()))

    @torch.no_grad()
    def losses(self, n: int, seed: int) -> AnimalsFactsLosses:
        """The model's loss beside the best affine map and the zero prediction, on n fresh samples."""
        b = self.generator.sample(n, torch.Generator().manual_seed(seed))
        x, y = b.x.double(), (b.animal_coeffs @ self.facts).double()
        X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
        fit = X @ torch.linalg.lstsq(X, y).solution
        return AnimalsFactsLosses(float((self.model(b.x).double() - y).pow(2).mean()),
                                  float((fit - y).pow(2).mean()), float(y.pow(2).mean()))


def load_or_train(cfg: AnimalsFactsConfig, cache: Path | None, device: str, progress: bool) -> AnimalsFacts:
    """The trained model of cfg, from cache/ if it holds this cfg's weights, else trained (and saved there)."""
    cfg.validate()
    if cache is not None and (cache / "animals_facts.json").is_file():
        if json.loads((cache / "animals_facts.json").read_text()) == asdict(cfg):
            model = AnimalsFacts(cfg.d, cfg.n_animals, cfg.n_facts).to(device)
            model.load_state_dict(load_file(str(cache / "animals_facts.safetensors"), device=device))
            return model.eval().requires_grad_(False)
    model = train_animals_facts(cfg, progress=progress, device=device)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / "animals_facts.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(cache / "animals_facts.safetensors")   # weights first, then the json that vouches for them
        write_url_atomic(str(cache / "animals_facts.json"), json.dumps(asdict(cfg)).encode())
    return model


def animals_facts_factory() -> Callable[[ToyRequest], GroundTruthModel]:
    """The registry entry for "animals-facts" (default sizes, the request's seed)."""
    def factory(req: ToyRequest) -> GroundTruthModel:
        cfg = AnimalsFactsConfig(seed=req.seed)
        return AnimalsFactsTruth(load_or_train(cfg, req.cache, req.device, req.progress), cfg)
    return factory
