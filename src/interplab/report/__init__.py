"""Figures and reports (matplotlib, Agg backend; PNG and Markdown files written atomically)."""

from interplab.report.eval_report import write_eval_report
from interplab.report.figures import kl_gap_vs_frequency, kl_histograms, pareto, pareto_from_metrics
from interplab.report.perturb_figures import perturbation_curves

__all__ = ["kl_gap_vs_frequency", "kl_histograms", "pareto", "pareto_from_metrics", "perturbation_curves",
           "write_eval_report"]
