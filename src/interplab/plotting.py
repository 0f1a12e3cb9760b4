"""The plotting helpers every capability draws its figures with: a standalone Agg figure, saved atomically as PNG.

Figures are `matplotlib.figure.Figure`s on the Agg canvas, never pyplot: no global state, no display needed, safe in
threads. Each capability keeps its own figures beside its methods and draws them with these two functions.
"""

from __future__ import annotations

import io
import math

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from interplab.fileio import write_url_atomic


def new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Axes]:
    """A `width` x `height` inch figure (100 dpi, constrained layout) and its axes: one `Axes`, or an array of
    `ncols` of them side by side."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def save_figure(fig: Figure, path: str) -> str:
    """Render `fig` as PNG and write it atomically to `path` (local path or fsspec URL); return `path`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_url_atomic(path, buf.getvalue())
    return path


def num(value: float | int | None) -> float:
    """A metric as a float to plot, with a missing (None) value as NaN so matplotlib leaves a gap."""
    return math.nan if value is None else float(value)
