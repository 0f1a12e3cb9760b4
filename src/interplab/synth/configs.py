"""The configs of the `interplab synth` commands (bench, score, model, tms): standard library only, so that building
the command line imports no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from interplab.errors import InterplabError, check_int

ARCH_SPARSITY = {"relu": "l1_coefficient", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coefficient",
                 "matryoshka": "k"}
"""The sweep field that sets each architecture's sparsity."""
TMS_PARTS = ("pictures", "sweep")
"""What `synth tms` can run."""


@dataclass
class SynthBenchConfig:
    """Train every SAE architecture on planted-feature generators and score each against the planted truth."""

    generators: list[str] = field(default_factory=lambda: ["sparse", "animals"])
    """Generator specs, comma-separated (sparse, animals, or with settings: sparse:mean_active=10)."""
    archs: list[str] = field(default_factory=lambda: list(ARCH_SPARSITY))
    """Architectures to train: relu, topk, batchtopk, jumprelu, matryoshka."""
    expansion: list[int] = field(default_factory=lambda: [4])
    """Dictionary widths as multiples of the data dimension d (e.g. 2,4,8 for a width sweep; each width costs time).
    4 is 1,024 latents for the default generators: twice the 512 planted features of `sparse`."""
    k: list[int] = field(default_factory=lambda: [5, 10])
    """topk/batchtopk/matryoshka: active latents per sample (the default generator has 5 features active on average)."""
    l1_coefficient: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """relu: L1 coefficients."""
    l0_coefficient: list[float] = field(default_factory=lambda: [0.3, 1.0])
    """jumprelu: L0 coefficients."""
    tokens: int = 1_000_000
    """Training samples per SAE (ReLU/L1 at 4x reaches MMCS 0.99 on the default sparse generator by 1M; TopK is
    still improving at 4M)."""
    batch_size: int = 256
    """Samples per training step (more, smaller steps learn these features faster than batches of 1024)."""
    lr: float = 3e-3
    """Adam learning rate."""
    eval_samples: int = 8192
    """Held-out samples each SAE is scored on."""
    threshold: float = 0.9
    """Cosine at which a planted feature counts as recovered."""
    quick: bool = False
    """A seconds-long smoke version (small generators, one width and sparsity, 20k samples): for CI, not for figures."""
    out: str = "synth-bench"
    """Run folder: config.json, metrics.json (every row and the summary), bench.md (the table), figures/ and runs/
    (the trained SAEs; an interrupted bench resumes with the same config, finished SAEs are not retrained)."""
    seed: int = 0
    """Seed of the generators, the training runs and the held-out sample."""
    device: str | None = None
    """Device to train on (default: cuda if available, else cpu)."""

    def resolved(self) -> SynthBenchConfig:
        """The settings actually run: `quick` shrinks everything."""
        if not self.quick:
            return self
        small = {"sparse": "sparse:n_features=64,d=32,mean_active=3",
                 "animals": "animals:n_animals=60,n_attributes=12,attributes_per_animal=3,n_independent=16,d=48"}
        return SynthBenchConfig(**{**asdict(self), "generators": [small.get(g, g) for g in self.generators],
                                   "expansion": self.expansion[:1], "k": self.k[:1],
                                   "l1_coefficient": self.l1_coefficient[:1], "l0_coefficient": self.l0_coefficient[:1],
                                   "tokens": min(self.tokens, 20_000), "batch_size": min(self.batch_size, 256),
                                   "eval_samples": min(self.eval_samples, 1024), "quick": False})

    def validate(self) -> None:
        unknown = [a for a in self.archs if a not in ARCH_SPARSITY]
        if unknown:
            raise InterplabError(f"unknown --archs {unknown}; valid: {', '.join(ARCH_SPARSITY)}")
        if not self.generators or not self.archs:
            raise InterplabError("--generators and --archs each need at least one value")
        if self.tokens < self.batch_size or self.eval_samples < 2:
            raise InterplabError(f"--tokens ({self.tokens}) must hold one --batch-size ({self.batch_size}) and "
                                 f"--eval-samples ({self.eval_samples}) must be >= 2")


@dataclass
class SynthScoreConfig:
    """Score saved SAEs against a generator's planted truth, beside random and PCA controls."""

    sae: list[str] = field(default_factory=list)
    """SAE folders (comma-separated), e.g. trained by `sae train` on a store harvested from a planted model."""
    generator: str = "sparse"
    """The truth: a generator spec (sparse:mean_active=5) or a planted-model folder (its generator is read)."""
    samples: int = 8192
    """Held-out samples drawn from the generator to score codes and controls on."""
    threshold: float = 0.9
    """Cosine at which a planted feature counts as recovered."""
    seed: int = 0
    """Seed of the held-out sample (offset so that no training stream uses it) and of the random control."""

    def validate(self) -> None:
        if not self.sae:
            raise InterplabError("--sae needs at least one SAE folder")


@dataclass
class PlantedConfig:
    """A toy transformer whose embedding is a synthetic generator's samples (the truth is known at hook_embed)."""

    generator: str = "sparse"
    """Generator spec planted at hook_embed (sparse, animals, or with settings: sparse:mean_active=10)."""
    n_samples: int = 65_536
    """Rows of the table of planted samples (memory: n_samples x d floats; 64 MB at the defaults)."""
    n_layers: int = 2
    """Transformer blocks after the plant."""
    n_heads: int = 4
    """Attention heads per block."""
    d_head: int = 16
    """Width of each head."""
    d_mlp: int = 512
    """MLP width; 0 makes the blocks attention-only."""
    n_ctx: int = 128
    """Longest context."""
    init_std: float = 0.02
    """Standard deviation of the random block weights (how much the blocks add to the planted stream)."""
    unembed_std: float = 0.2
    """Standard deviation of the random readout W_U, in units where the final LayerNorm's output has norm sqrt(d)."""
    seed: int = 0
    """Seed of the table and the block weights (the generator's own seed is part of its spec)."""
    out: str = "planted-model"
    """Folder the model is written to (`synth model`); pass it to harvest, sae train and sae eval as --model."""

    def validate(self) -> None:
        check_int("n_samples", self.n_samples, 2)
        check_int("n_ctx", self.n_ctx, 2)
        check_int("d_mlp", self.d_mlp, 0)
        for name in ("init_std", "unembed_std"):
            if not getattr(self, name) >= 0:
                raise InterplabError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TMSRunConfig:
    """Toy models of superposition (Elhage et al. 2022): the n=5, m=2 pictures and the n=200, m=20 sweep."""

    parts: list[str] = field(default_factory=lambda: list(TMS_PARTS))
    """What to run, comma-separated: pictures, sweep."""
    sweep_instances: int = 24
    """Sparsity values in the n=200, m=20 sweep (1/(1−S) log-spaced from 1 to 10); about 2.5 s each on one core."""
    steps: int | None = None
    """Training steps (default: 6000 for the pictures, 3000 for the sweep)."""
    out: str = "tms"
    """Run folder: config.json, metrics.json and figures/ (a rerun with the same config reports it)."""
    seed: int = 0
    """Seed of the initialisation and the data."""
    device: str = "cpu"
    """Device to train on."""

    def validate(self) -> None:
        unknown = [p for p in self.parts if p not in TMS_PARTS]
        if unknown or not self.parts:
            raise InterplabError(f"--parts {self.parts} is not valid; choose from {', '.join(TMS_PARTS)}")
        if self.sweep_instances < 2:
            raise InterplabError(f"--sweep-instances must be >= 2, got {self.sweep_instances}")
