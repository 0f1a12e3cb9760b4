"""Patching metrics, read at the last position, and their normalisation (0 = corrupted run, 1 = clean run).

- logit-diff: logit(answer) − logit(wrong);
- prob: p(answer);
- kl: KL(p_clean ‖ p), which is 0 on the clean run, so normalising still puts clean at 1.

Every metric maps logits `[n, pos, vocab]` to one value per pair `[n]`, and is differentiable (attribution
patching takes its gradient).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError

METRICS = ("logit-diff", "prob", "kl")

Metric = Callable[[Float[torch.Tensor, "n pos vocab"]], Float[torch.Tensor, " n"]]


class MetricTargets(NamedTuple):
    """What a metric reads: the answer and wrong token of each pair, and the clean run's last-position logits."""

    answer: Int[torch.Tensor, " n"]
    wrong: Int[torch.Tensor, " n"]
    clean_logits: Float[torch.Tensor, "n vocab"]


class PairMetric:
    """A metric for a batch of pairs: `metric(logits) -> [n]`; `metric.rows(slice)` is the same metric for a chunk
    of those pairs (so long sweeps can run the pairs in batches)."""

    def __init__(self, name: str, targets: MetricTargets):
        if name not in METRICS:
            raise InterplabError(f"metric {name!r} is not valid; choose {', '.join(METRICS)}")
        self.name, self.targets = name, targets

    def rows(self, rows: slice) -> PairMetric:
        t = self.targets
        return PairMetric(self.name, MetricTargets(t.answer[rows], t.wrong[rows], t.clean_logits[rows]))

    def __call__(self, logits: Float[torch.Tensor, "n pos vocab"]) -> Float[torch.Tensor, " n"]:
        last = logits[:, -1]
        if self.name == "logit-diff":
            rows = torch.arange(last.shape[0], device=last.device)
            answer, wrong = self.targets.answer.to(last.device), self.targets.wrong.to(last.device)
            return last[rows, answer] - last[rows, wrong]
        logp = last.float().log_softmax(-1)
        if self.name == "prob":
            rows = torch.arange(last.shape[0], device=last.device)
            return logp[rows, self.targets.answer.to(last.device)].exp()
        clean_logp = self.targets.clean_logits.to(last.device).float().log_softmax(-1)
        return (clean_logp.exp() * (clean_logp - logp)).sum(-1)  # KL(p_clean ‖ p)


def make_metric(name: str, targets: MetricTargets) -> PairMetric:
    """The metric called `name` (logit-diff, prob, kl) for these pairs."""
    return PairMetric(name, targets)


class Baseline(NamedTuple):
    """The metric of each pair on the unpatched clean and corrupted runs."""

    clean: Float[torch.Tensor, " n"]
    corrupted: Float[torch.Tensor, " n"]

    @property
    def gap(self) -> float:
        """mean(clean − corrupted): the shared denominator of the normalisation."""
        return float((self.clean - self.corrupted).mean())


def normalise(values: Float[torch.Tensor, "n *cells"], baseline: Baseline) -> Float[torch.Tensor, "n *cells"]:
    """(m_i − corrupted_i) / mean_j(clean_j − corrupted_j).

    Each pair keeps its own corrupted baseline, and all pairs share one denominator, so that the mean over pairs is
    exactly TransformerLens's batch-normalised score (mean m − mean corrupted) / (mean clean − mean corrupted) while
    a pair with a tiny clean–corrupted gap cannot blow up. Clean activations everywhere give mean 1, corrupted 0.
    """
    gap = baseline.gap
    if abs(gap) < 1e-8:
        raise InterplabError("the clean and corrupted runs give the same mean metric, so effects cannot be "
                             "normalised; use prompts the model distinguishes (see the clean accuracy)")
    corrupted = baseline.corrupted.to(values.device).reshape(-1, *[1] * (values.ndim - 1))
    return (values - corrupted) / gap


def null_effect(values: Float[torch.Tensor, "n *cells"], baseline: Baseline) -> Float[torch.Tensor, "n *cells"]:
    """The null control's change of the clean metric, in the same units:
    (m_i − clean_i) / mean(clean − corrupted)."""
    clean = baseline.clean.to(values.device).reshape(-1, *[1] * (values.ndim - 1))
    return (values - clean) / baseline.gap
