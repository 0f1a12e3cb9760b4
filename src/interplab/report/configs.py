"""The configs of `interplab report runs` and `interplab report pareto` (standard library only, so `--help` stays
fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ParetoConfig", "RunReportConfig"]


@dataclass
class RunReportConfig:
    """Write report.html (config, metrics, figures) into every run folder under a root, and an index of them all."""

    root: str = "."
    """Folder searched recursively for run folders (local path)."""
    out: str = ""
    """Index page to write (default: ROOT/index.html)."""
    headline: int = 12
    """Scalars shown per result file in a report (the full JSON is one click away)."""
    max_json_kb: int = 512
    """A result JSON larger than this is linked rather than embedded in its report."""


@dataclass
class ParetoConfig:
    """Draw the L0 Pareto plot (FVU and CE-loss-recovered) of several SAEs from their evaluation results."""

    metrics: list[str] = field(default_factory=list)
    """metrics.json files written by `interplab sae eval --out`, comma-separated (one point per SAE)."""
    out: str = "pareto.png"
    """PNG to write (local path or fsspec URL)."""
