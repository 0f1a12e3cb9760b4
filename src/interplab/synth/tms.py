"""Toy models of superposition (Elhage et al. 2022): many small ReLU-output autoencoders trained at once.

One instance compresses n sparse features into m < n hidden dimensions and reads them back with the transpose:

    h  = W x                       W [m, n], x ∈ [0, 1]ⁿ
    x′ = ReLU(Wᵀ h + b) = ReLU(WᵀW x + b)

Feature i is present with probability 1 − S (then uniform on [0, 1], else 0) and matters with importance Iᵢ, and
the loss is the importance-weighted squared error Σᵢ Iᵢ (xᵢ − x′ᵢ)², averaged over the batch. Dense data (S = 0)
gives the PCA-like solution (the m most important features, orthogonal); sparse data makes it worth packing more
features than dimensions (superposition), at the price of interference that the ReLU and the bias filter out.

All instances, one per sparsity in `TMSConfig.sparsities`, are trained together as one batched matrix product: W is
[instances, m, n]. Their losses are summed, and since no parameter is shared each instance gets exactly the
gradient it would get alone (Adam's per-parameter scaling keeps them independent as well).

The geometry of the trained W (feature dimensionality, dimensions per feature, fraction clusters) is in
`interplab.synth.tms_geometry`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interplab.errors import InterplabError


def sparsity_sweep(count: int, max_inverse_density: float) -> list[float]:
    """`count` sparsities whose 1/(1 − S) (the mean number of samples per appearance of a feature) is log-spaced
    from 1 (dense, S = 0) to `max_inverse_density`: the x-axis of the paper's dimensionality plot."""
    if count < 1 or max_inverse_density < 1:
        raise InterplabError(f"sparsity_sweep needs count >= 1 and max_inverse_density >= 1 "
                             f"(got count={count}, max_inverse_density={max_inverse_density})")
    if count == 1:
        return [0.0]
    return [1.0 - max_inverse_density ** (-i / (count - 1)) for i in range(count)]


@dataclass
class TMSConfig:
    """Train a toy model of superposition: one instance per sparsity, all in one batched run."""

    n_features: int = 5
    """Number of input features n (the model's input and output width)."""
    n_hidden: int = 2
    """Hidden dimensions m; superposition means representing more than m features in them."""
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.7, 0.9, 0.97, 0.99, 0.997])
    """Feature sparsity S of each instance, in [0, 1): a feature is 0 with probability S, else uniform on [0, 1]."""
    importance_decay: float = 0.9
    """Importance of feature i is decay**i (1 = all features equally important); must be > 0."""
    steps: int = 6000
    """Adam steps (the dense instance is the slowest: two near-equal features take a while to stop sharing a
    dimension)."""
    batch_size: int = 256
    """Samples per step (drawn fresh each step, for every instance)."""
    lr: float = 3e-3
    """Adam learning rate; it decays along a cosine to lr/10 over the last half of training, which settles the
    geometry (clusters at exact fractions) without slowing the early phase."""
    bias_at_mean: bool = False
    """Start bᵢ at E[xᵢ] = (1 − S)/2, the best bias of the W = 0 model, instead of at 0 (on in the n = 200 sweep, off
    for the n = 5 pictures, where b = 0 converges as fast or faster). From b = 0 on dense data
    (mean 0.5 per feature) W first spends its hidden dims carrying the mean and stalls there: the n = 200, m = 20
    instance at S = 0 ended 3000 steps at loss 23.3, worse than predicting the mean (200/12 = 16.7); from the mean it
    reaches the optimum 180/12 = 15.0. Sparse instances (small mean) are hardly affected."""
    seed: int = 0
    """Seeds both the initialisation and the data."""
    device: str = "cpu"
    """Torch device (cpu, cuda, ...)."""

    def importance(self) -> Float[Tensor, " n_features"]:
        """Iᵢ = decay**i."""
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)

    def check(self) -> None:
        """Raise InterplabError naming the first bad field and what is valid."""
        if self.n_hidden < 1:
            raise InterplabError(f"n_hidden must be >= 1 (got {self.n_hidden})")
        if self.n_features < 1:
            raise InterplabError(f"n_features must be >= 1 (got {self.n_features})")
        if not self.sparsities:
            raise InterplabError("sparsities must list at least one sparsity in [0, 1)")
        bad = [s for s in self.sparsities if not (0.0 <= s < 1.0)]
        if bad:
            raise InterplabError(f"every sparsity must be in [0, 1) (S = 1 would mean features never appear); "
                                 f"got {bad}")
        if not (self.importance_decay > 0 and math.isfinite(self.importance_decay)):
            raise InterplabError(f"importance_decay must be a finite number > 0 (got {self.importance_decay})")
        if self.steps < 1 or self.batch_size < 1:
            raise InterplabError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not self.lr > 0:
            raise InterplabError(f"lr must be > 0 (got {self.lr})")


def dimensionality_sweep_config(count: int = 24, max_inverse_density: float = 10.0, **overrides) -> TMSConfig:
    """The n = 200, m = 20 sweep behind the dimensionality plot: equal importances, `count` sparsities log-spaced in
    1/(1 − S) from 1 to `max_inverse_density` (the range where D* falls from 1 through the 1/2 plateau to the 2/5 and
    3/8 clusters, ~0.3), 3000 steps of 256: about a minute on one CPU core for 24 instances.

    It gives Dᵢ clusters at 2/3, 1/2, 2/5, 3/8 but none at 1 or 3/4: with equal importance, low sparsity barely prefers
    axis-aligned features to a spread rank-m projection (equal loss at S = 0), so ~190 unrepresented columns keep
    norms 0.1-0.3 and hold the (mutually near-orthogonal) represented ones at Dᵢ ≈ 0.7. 10000 steps of 1024 at
    lr 1e-2 (~40x the compute) still left them at 0.68-0.73."""
    fields = dict(n_features=200, n_hidden=20, sparsities=sparsity_sweep(count, max_inverse_density),
                  importance_decay=1.0, steps=3000, batch_size=256, lr=3e-3, bias_at_mean=True)
    return TMSConfig(**{**fields, **overrides})


class TMSResult(NamedTuple):
    W: Float[Tensor, "instances m n"]
    """Trained weights; column W[k, :, i] is feature i's direction in instance k."""
    b: Float[Tensor, "instances n"]
    """Trained output biases."""
    loss: Float[Tensor, " instances"]
    """Each instance's loss, averaged over the last 10% of steps (one batch is noisy at high sparsity)."""
    config: TMSConfig
    """The config that produced it (sparsities[k] belongs to instance k)."""
    seconds: float
    """Wall-clock training time."""


def sample_features(probability: Float[Tensor, "instances 1 1"], batch_size: int, n_features: int,
                    generator: torch.Generator | None = None) -> Float[Tensor, "instances batch n"]:
    """Sparse features: each is present with `probability` (1 − S, per instance) and then uniform on [0, 1].

    One uniform draw u does both jobs: the feature is present when u < p, and given that, u/p is uniform on [0, 1].
    So x = u/p where u/p < 1 else 0, with half the random numbers and no extra tensors."""
    x = torch.rand(probability.shape[0], batch_size, n_features, generator=generator,
                   device=probability.device).div_(probability)
    return x.masked_fill_(x >= 1, 0.0)


def tms_forward(x: Float[Tensor, "instances batch n"], W: Float[Tensor, "instances m n"],
                b: Float[Tensor, "instances 1 n"]) -> Float[Tensor, "instances batch n"]:
    """x′ = ReLU(WᵀW x + b) for every instance, as two batched matmuls (instances are bmm's batch dimension)."""
    h = torch.bmm(x, W.transpose(1, 2))  # [instances, batch, m]
    return torch.relu(torch.baddbmm(b, h, W))


def _lr_factor(step: int, steps: int) -> float:
    """Constant for the first half, then a cosine from 1 down to 0.1 at the last step."""
    half = steps // 2
    if step < half:
        return 1.0
    t = (step - half) / max(1, steps - 1 - half)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def train_tms(cfg: TMSConfig, progress: bool = True) -> TMSResult:
    """Train one toy model per sparsity, all at once; see the module docstring for the model and loss.

    loss = Σ_instances mean_batch Σᵢ Iᵢ (xᵢ − x′ᵢ)²; W starts Xavier-normal, b at 0 (or at the feature mean (1 − S)/2
    with bias_at_mean)."""
    cfg.check()
    device = torch.device(cfg.device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    k, m, n = len(cfg.sparsities), cfg.n_hidden, cfg.n_features
    prob = (1.0 - torch.tensor(cfg.sparsities, dtype=torch.float32, device=device)).view(k, 1, 1)
    importance = cfg.importance().to(device)

    std = math.sqrt(2.0 / (m + n))  # Xavier normal for an [m, n] matrix
    W = (torch.randn(k, m, n, generator=gen, device=device) * std).requires_grad_()
    b = (prob / 2 if cfg.bias_at_mean else torch.zeros_like(prob)).expand(k, 1, n).clone().requires_grad_()
    opt = torch.optim.Adam([W, b], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps))

    tail = max(1, cfg.steps // 10)
    loss_sum = torch.zeros(k, device=device)
    start = time.perf_counter()
    bar = None
    if progress:
        bar = tqdm(total=cfg.steps, desc="tms", unit="step")
    for step in range(cfg.steps):
        x = sample_features(prob, cfg.batch_size, n, gen)
        err = (tms_forward(x, W, b) - x).square_().mul_(importance)
        per_instance = err.sum(dim=(1, 2)) / cfg.batch_size
        opt.zero_grad(set_to_none=True)
        per_instance.sum().backward()  # summed: each instance's parameters see only their own loss
        opt.step()
        sched.step()
        if step >= cfg.steps - tail:
            loss_sum += per_instance.detach()
        if bar is not None and (step % 100 == 0 or step == cfg.steps - 1):
            bar.update(step + 1 - bar.n)
            bar.set_postfix(loss=f"{per_instance.detach().mean().item():.4g}")
    if bar is not None:
        bar.close()
    return TMSResult(W=W.detach(), b=b.detach().squeeze(1), loss=loss_sum / tail, config=cfg,
                     seconds=time.perf_counter() - start)
