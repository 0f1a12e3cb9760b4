"""`CLTRun`: one cross-layer transcoder of a sweep and what trains it: optimiser, dead-feature counters, metrics.

Every run of a sweep gets the same (normalised) rows; each has its own Adam state, so a CLT trained in a sweep ends
bit-identical to the same CLT trained alone. Under torchrun each rank passes its share of the rows, and the
gradients and the step's statistics travel in one all-reduce (data_parallel.py), so every rank takes the same step.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.crosslayer_config import CLTPoint, CLTTrainConfig
from interplab.sae.data_parallel import reduce_gradients

ADAM_BETAS = (0.9, 0.999)
Metrics = dict[str, float | list[float]]
"""One log entry: numbers, and per-layer lists."""


class CLTRun:
    """One CLT being trained: the CLT, its optimiser, its dead-feature counters and its metrics window."""

    def __init__(self, point: CLTPoint, cfg: CLTTrainConfig, n_layers: int, d_model: int, device: torch.device,
                 world_size: int = 1) -> None:
        self.point, self.cfg, self.world_size = point, cfg, world_size
        self.clt = CrossLayerTranscoder(n_layers, d_model, point.d_sae, activation=cfg.activation, k=point.k,
                                        init_threshold=cfg.jumprelu_init_threshold, in_hook=cfg.in_hook,
                                        out_hook=cfg.out_hook, seed=cfg.seed).to(device)
        self.optimizer = torch.optim.Adam(self.clt.parameters(), lr=cfg.lr, betas=ADAM_BETAS, fused=True)
        self.since_fired = torch.zeros(n_layers, point.d_sae, dtype=torch.long, device=device)
        """Tokens seen since each feature last fired, per layer."""
        self.window = torch.zeros(3 * n_layers + 1, dtype=torch.float64, device=device)
        """Sums over the logging window: squared error and target variance per output layer, L0·tokens per source
        layer, loss·tokens."""
        self.window_tokens = 0
        self.history: list[Metrics] = []

    def train_step(self, xs: list[Float[Tensor, "rows d_model"]], ys: list[Float[Tensor, "rows d_model"]],
                   total_var: Float[Tensor, " n_layers"], lr: float) -> bool:
        """One Adam step on this rank's rows (`total_var`: the whole batch's target variance per layer, summed
        over rows); False (and nothing changed) if the loss is not finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        L, n = self.clt.n_layers, len(xs[0])
        out = self.clt.training_loss(xs, ys, l1_coefficient=self.point.l1_coefficient,
                                     l0_coefficient=self.point.l0_coefficient, bandwidth=self.cfg.jumprelu_bandwidth,
                                     dead_mask=self.dead_mask(), aux_k=self.cfg.aux_k,
                                     aux_coefficient=self.cfg.aux_coefficient)
        out.loss.backward()
        # Sums over rows and fire flags: summed over ranks they describe the whole batch.
        stats = torch.cat([out.se, out.l0_layers * n, (out.loss.detach() * n)[None], out.fired.flatten().float()])
        if self.world_size > 1:
            stats = reduce_gradients(self.clt.parameters(), stats, self.world_size)
        se, l0_sum, loss_sum, fired = stats[:L], stats[L:2 * L], stats[2 * L], stats[2 * L + 1:]
        if not bool(torch.isfinite(loss_sum)):  # the same decision on every rank: loss_sum was reduced
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.clt.before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.clt.after_optimizer_step()
        with torch.no_grad():
            rows = n * self.world_size
            self.since_fired += rows
            self.since_fired[fired.view(L, -1) > 0] = 0
            self.window += torch.cat([se, total_var.to(se), l0_sum, loss_sum[None]]).double()
            self.window_tokens += rows
        return True

    def dead_mask(self) -> torch.Tensor:
        """[n_layers, d_sae]: features that have not fired for the dead window."""
        return self.since_fired >= self.cfg.dead_window

    # ---- metrics --------------------------------------------------------------------------------------------
    def window_metrics(self, out_scales: list[float]) -> Metrics:
        """Metrics over the steps since the last log: per layer fvu, mse (per element, raw units), l0 and
        dead_fraction; overall fvu (Σ squared error / Σ variance over layers), mse, l0 (summed over layers), loss
        (normalised units), dead_fraction."""
        L, d = self.clt.n_layers, self.clt.d_model
        se, tv, l0 = (self.window[a * L:(a + 1) * L] for a in range(3))
        n = max(self.window_tokens, 1)
        mse = [float(s) / (n * d) / t**2 for s, t in zip(se, out_scales)]
        dead = self.dead_mask().double().mean(1)
        return {
            "fvu": float(se.sum() / tv.sum()) if tv.sum() > 0 else float("nan"),
            "mse": sum(mse) / L,
            "l0": float(l0.sum()) / n,
            "loss": float(self.window[-1]) / n,
            "dead_fraction": float(dead.mean()),
            "fvu_per_layer": [float(s / v) if v > 0 else float("nan") for s, v in zip(se, tv)],
            "mse_per_layer": mse,
            "l0_per_layer": (l0 / n).tolist(),
            "dead_fraction_per_layer": dead.tolist(),
        }

    def log(self, step: int, tokens: int, lr: float, out_scales: list[float]) -> Metrics:
        """Close the logging window: record its metrics in the history and start a new window."""
        entry: Metrics = {"step": step, "tokens": tokens, "lr": lr, **self.window_metrics(out_scales)}
        self.history.append(entry)
        self.window.zero_()
        self.window_tokens = 0
        return entry

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"clt": self.clt.state_dict(), "optimizer": self.optimizer.state_dict(),
                "since_fired": self.since_fired, "window": self.window, "window_tokens": self.window_tokens,
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clt.load_state_dict(state["clt"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.since_fired.copy_(state["since_fired"])
        self.window.copy_(state["window"])
        self.window_tokens = int(state["window_tokens"])
        self.history = [dict(entry) for entry in state["history"]]
