"""Running statistics of the residual stream for `interplab weights outliers` (the criteria are in outliers.py).

`BasisStats` keeps, per (stage, dim), the max |x| and where it occurs, float64 sums for the means, variances and
cosine terms, a histogram of |x| for the median, and the candidate massive values; `collect_stats` feeds it every
stage of one forward pass, in the standard basis and in a random rotation of it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from jaxtyping import Float, Int

from interplab.models.hooked import HookedModel
from interplab.weights.configs import OutliersConfig

HIST_SHIFT = 16
"""|x| is binned by the top bits of its float32 pattern (8 exponent + 7 mantissa bits): log-spaced bins, each
spanning a factor of at most 1 + 2^-7, covering every float without a range to choose."""
HIST_BINS = 1 << (31 - HIST_SHIFT)
_EDGES = (torch.arange(HIST_BINS + 1, dtype=torch.int64) << HIST_SHIFT).to(torch.int32).view(torch.float32)
"""Bin b holds the floats from _EDGES[b] up to _EDGES[b + 1] (the last edge wraps to -0.0 and is never used:
it would be NaN's bin)."""
RECORD_SLACK = 0.5
"""Values are recorded when above massive_abs and above RECORD_SLACK × massive_ratio × the stage's running median,
so a value is missed only if the final median falls below half the running median at its batch (checked)."""


# ---- running statistics --------------------------------------------------------------------------------------
class BasisStats:
    """Running per-(stage, dim) statistics of the residual stream in one basis (see the module docstring)."""

    def __init__(self, n_stages: int, d: int, device: torch.device, cfg: OutliersConfig):
        z64 = lambda: torch.zeros(n_stages, d, dtype=torch.float64, device=device)  # noqa: E731
        self.max_abs = torch.zeros(n_stages, d, device=device)
        self.max_value = torch.zeros(n_stages, d, device=device)
        """The signed value at the max |x|."""
        self.max_index = torch.zeros(n_stages, d, dtype=torch.long, device=device)
        """Where it is: context · ctx_len + position."""
        self.max_token = torch.zeros(n_stages, d, dtype=torch.long, device=device)
        self.sum_abs, self.sum, self.sum_sq, self.sum_unit = z64(), z64(), z64(), z64()
        self.hist = torch.zeros(n_stages, HIST_BINS, dtype=torch.long, device=device)
        self.n = torch.zeros(n_stages, dtype=torch.long)
        """Tokens in the means (positions >= 1 with rogue_skip_first)."""
        self.massive_abs, self.massive_ratio, self.max_records = cfg.massive_abs, cfg.massive_ratio, cfg.max_records
        self.threshold_used = [0.0] * n_stages
        """The largest recording threshold each stage has used."""
        self.records: list[torch.Tensor] = []
        """Blocks of rows (stage, dim, index, token) of the recorded values, and the values."""
        self.record_values: list[torch.Tensor] = []
        self.n_recorded = self.n_candidates = 0
        """Values recorded, and values above the recording threshold (recorded or dropped by the cap)."""

    @torch.no_grad()
    def update(self, s: int, x: Float[torch.Tensor, "n d"], tokens: Int[torch.Tensor, " n"], first: int,
               in_means: torch.Tensor | None = None) -> None:
        """Add n tokens' activations at stage s; token i sits at stream index first + i. The means, variances and
        cosine terms use only the rows where `in_means` (a bool mask) is true; max, median and records use all."""
        a = x.abs()
        top, where = a.max(dim=0)
        better = top > self.max_abs[s]
        self.max_abs[s] = torch.where(better, top, self.max_abs[s])
        self.max_value[s] = torch.where(better, x.gather(0, where[None])[0], self.max_value[s])
        self.max_index[s] = torch.where(better, where + first, self.max_index[s])
        self.max_token[s] = torch.where(better, tokens[where], self.max_token[s])
        self._add_sums(s, x if in_means is None else x[in_means])
        self.hist[s] += torch.bincount((a.contiguous().view(torch.int32) >> HIST_SHIFT).flatten(),
                                       minlength=HIST_BINS)[:HIST_BINS]
        median = float(_hist_median(self.hist[s : s + 1])[0])
        threshold = max(self.massive_abs, RECORD_SLACK * self.massive_ratio * median)
        self.threshold_used[s] = max(self.threshold_used[s], threshold)
        self._record(s, x, a > threshold, tokens, first)

    def _add_sums(self, s: int, x: Float[torch.Tensor, "n d"]) -> None:
        # float32 sums within a batch (a few thousand tokens), float64 across batches
        self.sum_abs[s] += x.abs().sum(0)
        self.sum[s] += x.sum(0)
        self.sum_sq[s] += torch.einsum("nd,nd->d", x, x)
        self.sum_unit[s] += (1 / x.norm(dim=1).clamp_min(1e-30)) @ x
        self.n[s] += x.shape[0]

    def _record(self, s: int, x: torch.Tensor, above: torch.Tensor, tokens: torch.Tensor, first: int) -> None:
        rows, dims = above.nonzero(as_tuple=True)
        self.n_candidates += len(rows)
        keep = min(len(rows), self.max_records - self.n_recorded)
        if keep <= 0:
            return
        rows, dims = rows[:keep], dims[:keep]
        self.records.append(torch.stack([torch.full_like(rows, s), dims, rows + first, tokens[rows]], 1).cpu())
        self.record_values.append(x[rows, dims].float().cpu())
        self.n_recorded += keep

    # ---- the finished statistics ---------------------------------------------------------------------------
    def _per_token(self, sums: torch.Tensor) -> Float[torch.Tensor, "stage d"]:
        return (sums / self.n[:, None].to(sums)).cpu()

    def mean_abs(self) -> Float[torch.Tensor, "stage d"]:
        return self._per_token(self.sum_abs)

    def mean(self) -> Float[torch.Tensor, "stage d"]:
        return self._per_token(self.sum)

    def var(self) -> Float[torch.Tensor, "stage d"]:
        return (self._per_token(self.sum_sq) - self.mean().square()).clamp_min(0)

    def cos_contrib(self) -> Float[torch.Tensor, "stage d"]:
        """c_d²: dim d's term of the expected cosine similarity of two independent tokens."""
        return self._per_token(self.sum_unit).square()

    def median_abs(self) -> Float[torch.Tensor, " stage"]:
        """Median |x| per stage, from the histogram (within a factor 1 + 2^-7 of the exact one)."""
        return _hist_median(self.hist).cpu()

    def records_complete(self) -> bool:
        """No value passing the massive criteria with the final medians was skipped: none above a threshold
        used during the pass, and the cap dropped nothing."""
        final = [max(self.massive_abs, self.massive_ratio * float(m)) for m in self.median_abs()]
        return self.n_recorded == self.n_candidates and all(u <= f for u, f in zip(self.threshold_used, final))

    def recorded(self) -> tuple[Int[torch.Tensor, "r 4"], Float[torch.Tensor, " r"]]:
        if not self.records:
            return torch.zeros(0, 4, dtype=torch.long), torch.zeros(0)
        return torch.cat(self.records), torch.cat(self.record_values)


def _hist_median(hist: Int[torch.Tensor, "k bins"]) -> Float[torch.Tensor, " k"]:
    """The median of each row's histogram over the float32 bit-pattern bins, linear inside the bin."""
    hist = hist.double()
    half = hist.sum(1) / 2
    cum = hist.cumsum(1)
    b = (cum < half[:, None]).sum(1).clamp_max(HIST_BINS - 1)  # first bin whose cumulative count reaches half
    below = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(half))
    frac = (half - below) / hist.gather(1, b[:, None])[:, 0].clamp_min(1)
    edges = _EDGES.to(hist.device, torch.float64)
    return edges[b] + frac * (edges[b + 1] - edges[b])


def random_rotation(d: int, seed: int) -> Float[torch.Tensor, "d d"]:
    """A Haar-random orthogonal matrix: QR of a seeded Gaussian, with R's diagonal made positive."""
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None]).float()


def stage_hooks(n_layers: int) -> list[str]:
    """The residual stream before block 0, then after every block."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]


@torch.no_grad()
def collect_stats(model: HookedModel, batches: Iterable[Int[torch.Tensor, "batch pos"]], rotation: torch.Tensor,
                  cfg: OutliersConfig) -> tuple[BasisStats, BasisStats, int]:
    """One pass over `batches` with hooks feeding every stage to the standard and rotated statistics.

    Returns (standard, rotated, tokens read). The pass stops after the last block (no unembedding)."""
    hooks = stage_hooks(model.info.n_layers)
    d, device = model.info.d_model, model.device
    std, rot = (BasisStats(len(hooks), d, device, cfg) for _ in range(2))
    rotation = rotation.to(device)
    current: dict[str, Any] = {"first": 0, "in_means": None}

    def reader(stage: int):
        def hook(act: torch.Tensor, _name: str) -> None:
            x = act.detach().reshape(-1, d).float()
            std.update(stage, x, current["tokens"], current["first"], current["in_means"])
            rot.update(stage, x @ rotation, current["tokens"], current["first"], current["in_means"])
        return hook

    for batch in batches:
        batch = model.check_tokens(batch)
        current["tokens"] = batch.reshape(-1)
        if cfg.rogue_skip_first:
            current["in_means"] = (torch.arange(batch.shape[1], device=device) > 0).repeat(batch.shape[0])
        model.run_with_cache(batch, [hooks[-1]], hooks=[(h, reader(s)) for s, h in enumerate(hooks)])
        current["first"] += batch.numel()
    return std, rot, current["first"]
