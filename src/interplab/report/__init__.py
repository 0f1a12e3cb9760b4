"""Figures for interplab's reports (matplotlib, Agg backend, PNG files written atomically)."""

from interplab.report.figures import kl_gap_vs_frequency, kl_histograms, pareto, pareto_from_metrics

__all__ = ["kl_gap_vs_frequency", "kl_histograms", "pareto", "pareto_from_metrics"]
