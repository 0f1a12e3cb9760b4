"""`SAERun`: one SAE of a sweep and everything that trains it: optimiser, dead-latent counters, metrics, resampling.

The trainer feeds every `SAERun` of a sweep the same batch; each keeps its own Adam state, so an SAE trained in a
sweep ends bit-identical to the same SAE trained alone.

A transcoder run gets a target with every batch: its SAE reconstructs the target from x, and a skip transcoder's
`W_skip` [d_in, d_in] (zero at the start, trained by the same Adam) adds x @ W_skip, which is the same as training
the SAE towards target − x @ W_skip and letting the gradient reach W_skip through that target.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.distributed import all_reduce_sum_
from interplab.sae.base import SparseAutoencoder, TrainOutput
from interplab.sae.config import SAEConfig
from interplab.sae.data_parallel import reduce_gradients
from interplab.sae.registry import make_sae

ADAM_BETAS = (0.9, 0.999)
RESAMPLE_ENC_FRACTION = 0.2
"""A resampled latent's encoder norm, relative to the mean encoder norm of the live latents (Anthropic, 2023)."""
_WINDOW = ("se", "tv", "l0", "loss")  # sums over the current logging window, each weighted by tokens


class SAERun:
    """One SAE being trained: the SAE, its optimiser, its dead-latent counters and its metrics."""

    def __init__(self, name: str, cfg: SAEConfig, device: torch.device | str, lr: float, seed: int,
                 world_size: int = 1, sae: nn.Module | None = None, skip: bool = False) -> None:
        self.name, self.cfg = name, cfg
        self.world_size = world_size
        """Data-parallel ranks sharing each batch (1: one process); see data_parallel.py."""
        self.sae: SparseAutoencoder = (sae if sae is not None else make_sae(cfg)).to(device)
        """The SAE, or this rank's slice of a latent-sharded one (sharded.py)."""
        self.sae.batch_ranks = world_size
        self.latent_shards: int = getattr(self.sae, "world_size", 1)
        """Ranks the SAE's latents are split over (1: this rank holds them all)."""
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, device=device)) if skip else None
        """A skip transcoder's linear skip connection (None: no skip)."""
        self.params = [*self.sae.parameters(), *([self.W_skip] if skip else [])]
        """Everything the optimiser trains (and data-parallel training averages)."""
        # fused: one kernel for the whole update, several times faster than the default on CPU as well as CUDA
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=ADAM_BETAS, fused=True)
        self.since_fired = torch.zeros(self.sae.W_dec.shape[0], dtype=torch.long, device=device)
        """Tokens seen since each latent (of this rank's, when latent-sharded) last fired."""
        self.resample_gen = torch.Generator().manual_seed(seed)
        """Draws the inputs that resampled latents point to (CPU; its own, so sweeps stay independent)."""
        self.window = torch.zeros(len(_WINDOW), dtype=torch.float64, device=device)
        self.window_tokens = 0
        self.history: list[dict[str, float]] = []

    @property
    def coefficient(self) -> float | None:
        """The sparsity coefficient the trainer warms up (None: the architecture has none)."""
        return {"relu": self.cfg.l1_coefficient, "jumprelu": self.cfg.l0_coefficient}.get(self.cfg.arch)

    def dead_mask(self, dead_window: int) -> torch.Tensor:
        return self.since_fired >= dead_window

    def train_step(
        self, x: Float[Tensor, "batch d_in"], total_var: Tensor, lr: float, sparsity: float, dead_window: int,
        target: Float[Tensor, "batch d_in"] | None = None,
    ) -> TrainOutput | None:
        """One optimiser step on `x` (this rank's rows of the batch when data-parallel; `total_var` is the whole
        batch's, of the target if there is one); returns the output, or None (and leaves the SAE untouched) if the
        loss is not finite. A transcoder run's `target` is what it reconstructs (its `recon` then leaves out the
        skip term x @ W_skip)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        coefficient = None if self.coefficient is None else self.coefficient * sparsity
        t = self._sae_target(x, target)
        kwargs = {} if t is None else {"target": t}  # the latent-sharded SAE takes no target
        out = self.sae.training_forward(x, **kwargs, sparsity_coefficient=coefficient,
                                        dead_mask=self.dead_mask(dead_window))
        out.loss.backward()
        with torch.no_grad():
            n = len(x)
            se = (out.recon.detach() - (x if t is None else t.detach())).pow(2).sum()
            # Sums over rows, and fire counts: summed over ranks they describe the whole batch.
            stats = torch.cat([torch.stack([out.loss.detach() * n, out.l0.detach() * n, se]), out.fired.float()])
        if self.world_size > 1:
            stats = reduce_gradients(self.params, stats, self.world_size)
        loss_sum, l0_sum, se = stats[:3]
        if not bool(torch.isfinite(loss_sum)):  # the same decision on every rank: loss_sum was reduced
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.sae.before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sae.after_optimizer_step()
        with torch.no_grad():
            n_batch = n * self.world_size
            self.since_fired += n_batch
            self.since_fired[stats[3:] > 0] = 0
            self.window += torch.stack([se, total_var.to(se), l0_sum, loss_sum]).double()
            self.window_tokens += n_batch
        return out

    def _sae_target(self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_in"] | None
                    ) -> Float[Tensor, "batch d_in"] | None:
        """What the SAE itself reconstructs: the target, less the skip term x @ W_skip (with its gradient)."""
        if target is None or self.W_skip is None:
            return target
        return target - x @ self.W_skip

    @torch.no_grad()
    def predict(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_in"]:
        """The run's full output on x: the SAE's reconstruction, plus x @ W_skip for a skip transcoder."""
        out = self.sae(x)
        return out if self.W_skip is None else out + x @ self.W_skip

    # ---- metrics --------------------------------------------------------------------------------------------
    def window_metrics(self, scale: float, dead_window: int) -> dict[str, float]:
        """Metrics over the steps since the last log: mse (per element, raw units), fvu, l0, loss, dead_fraction."""
        se, tv, l0, loss = self.window.tolist()
        n = max(self.window_tokens, 1)
        return {
            "mse": se / (n * self.cfg.d_in) / scale**2,
            "fvu": se / tv if tv > 0 else float("nan"),
            "l0": l0 / n,
            "loss": loss / n,
            "dead_fraction": float(self.dead_mask(dead_window).float().mean()),
        }

    def log(self, step: int, tokens: int, lr: float, scale: float, dead_window: int) -> dict[str, float]:
        """Close the logging window: record its metrics in the history and start a new window."""
        entry = {"step": step, "tokens": tokens, "lr": lr, **self.window_metrics(scale, dead_window)}
        if self.latent_shards > 1:  # every rank counts its own latents: a collective, so only here, on every rank
            dead = all_reduce_sum_(self.dead_mask(dead_window).sum().double())
            entry["dead_fraction"] = float(dead) / self.cfg.d_sae
        self.history.append(entry)
        self.window.zero_()
        self.window_tokens = 0
        return entry

    # ---- resampling -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def resample(self, x: Float[Tensor, "batch d_in"], dead_window: int,
                 target: Float[Tensor, "batch d_in"] | None = None) -> int:
        """Point every dead latent at an input of `x` drawn with probability proportional to its squared loss.

        As in Anthropic's "Towards Monosemanticity" (2023): the decoder row becomes the unit input direction (the
        input as the encoder reads it, b_dec subtracted when the architecture does), the encoder column that
        direction times 0.2 x the mean encoder norm of live latents, the encoder bias 0, and the Adam moments of
        those latents are reset. Returns the number of latents resampled. A transcoder's loss is against its
        `target`, its encoder points at the input and its decoder at the residual target − prediction there.
        """
        dead = self.dead_mask(dead_window).nonzero().flatten()
        if len(dead) == 0:
            return 0
        residual = (x if target is None else target) - self.predict(x)  # [batch d_in]
        loss = residual.pow(2).sum(-1)  # [batch]
        weights = loss.pow(2).double().cpu()
        if not (torch.isfinite(weights).all() and weights.sum() > 0):
            weights = torch.ones_like(weights)
        picks = torch.multinomial(weights, len(dead), replacement=True, generator=self.resample_gen).to(x.device)
        directions = x[picks] - self.sae.b_dec if self.cfg.subtract_b_dec else x[picks]
        alive = ~self.dead_mask(dead_window)
        enc_norm = float(self.sae.W_enc[:, alive].norm(dim=0).mean()) if bool(alive.any()) else 1.0
        self.sae.reinit_latents(dead, directions, RESAMPLE_ENC_FRACTION * enc_norm)
        if target is not None:  # the decoder writes the target's space: point it at what is missing there
            self.sae.W_dec[dead] = residual[picks] / residual[picks].norm(dim=1, keepdim=True).clamp_min(1e-12)
        for name, param in self.sae.named_parameters():  # W_skip has no per-latent rows
            axis = 1 if name == "W_enc" else 0
            state = self.optimizer.state.get(param)
            if name == "b_dec" or not state or param.ndim <= axis or param.shape[axis] != self.cfg.d_sae:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key].index_fill_(axis, dead, 0.0)
        self.since_fired[dead] = 0
        return len(dead)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired,
            "resample_gen": self.resample_gen.get_state(),
            "window": self.window,
            "window_tokens": self.window_tokens,
            "history": self.history,
            **({"W_skip": self.W_skip.detach()} if self.W_skip is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.since_fired.copy_(state["since_fired"])
        self.resample_gen.set_state(state["resample_gen"])
        self.window.copy_(state["window"])
        self.window_tokens = int(state["window_tokens"])
        self.history = [dict(entry) for entry in state["history"]]
        if self.W_skip is not None:
            with torch.no_grad():
                self.W_skip.copy_(state["W_skip"])
