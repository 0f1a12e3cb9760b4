"""Synthetic data with planted features, shared by the architecture tests' learning checks."""

from __future__ import annotations

import torch


def sparse_data(n: int, gen: torch.Generator, d: int = 32, m: int = 64, active: int = 3) -> torch.Tensor:
    """n samples, each a sum of `active` of m fixed random unit directions in d dims with magnitudes in [0.5, 1.5]."""
    codes = torch.zeros(n, m).scatter(1, torch.rand(n, m, generator=gen).argsort(1)[:, :active],
                                      torch.rand(n, active, generator=gen) + 0.5)
    return codes @ planted_directions(d, m)


def planted_directions(d: int = 32, m: int = 64) -> torch.Tensor:
    """The m unit directions in d dims that `sparse_data` draws from (fixed seed)."""
    dirs = torch.randn(m, d, generator=torch.Generator().manual_seed(0))
    return dirs / dirs.norm(dim=1, keepdim=True)


def train_on_planted(sae, gen: torch.Generator, steps: int, *, lr: float = 3e-3, batch: int = 256,
                     dead_after: int = 50) -> None:
    """Adam steps on fresh `sparse_data` batches, with AuxK fed the latents silent for `dead_after` steps."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(sae.cfg.d_sae)
    for _ in range(steps):
        out = sae.training_forward(sparse_data(batch, gen), dead_mask=since_fired > dead_after)
        since_fired = torch.where(out.fired, 0, since_fired + 1)
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
