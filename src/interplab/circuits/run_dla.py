"""`interplab dla`: direct logit attribution of the answer − wrong logit difference on clean prompts, beside the
same attribution onto a random token pair's difference (the size an unrelated direction gets).

Writes the run folder: OUT/config.json, OUT/metrics.json (every part's mean and SEM over prompts, per head and per
layer, the accumulated residual, the largest error of parts + constant against the model's logit difference),
OUT/figures/dla.png and OUT/report.md.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from interplab.circuits.configs import DLAConfig
from interplab.circuits.dla import DLAResult, direct_logit_attribution
from interplab.circuits.effects import mean_sem
from interplab.circuits.figures import dla_figure
from interplab.circuits.prompts import clean_accuracy, load_pairs
from interplab.fileio import write_url_atomic
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.runs import JSONDict, Run

KIND = "dla"
TOP = 12


def run_dla(cfg: DLAConfig, *, model: HookedModel | None = None, progress: bool = True) -> JSONDict:
    """Attribute, write the run folder, return the metrics (a complete run is not redone)."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:
            return run.metrics
        model = model or load_model(cfg.model, device=cfg.device)
        batch = load_pairs(model, cfg.prompts, cfg.n_pairs, cfg.seed)
        dla = _batched(model, batch.clean, batch.answer, batch.wrong, cfg.batch_size)
        g = torch.Generator().manual_seed(cfg.seed)
        random_pair = torch.randint(0, model.info.d_vocab, (2,), generator=g)
        n = batch.clean.shape[0]
        control = _batched(model, batch.clean, random_pair[0].repeat(n), random_pair[1].repeat(n), cfg.batch_size)
        result = summarise_dla(dla, control, model.info.n_layers)
        result.update({"config": asdict(cfg), "model": model.info.to_dict(), "n_prompts": n,
                       "accuracy": clean_accuracy(model, batch), "control_tokens": random_pair.tolist()})
        by_layer = result["by_layer"]
        result["figures"] = {"dla": dla_figure(np.array(result["heads"]["mean"]), np.array(by_layer["attn"]),
                                               np.array(by_layer["mlp"]), run.figure("dla"))}
        write_dla_report(run.path("report.md"), result)
        run.write_metrics(result)
        return {"kind": KIND, **result}


def _batched(model: HookedModel, tokens: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor,
             batch_size: int) -> DLAResult:
    parts = [direct_logit_attribution(model, tokens[i:i + batch_size], answer[i:i + batch_size],
                                      wrong[i:i + batch_size]) for i in range(0, tokens.shape[0], batch_size)]
    return DLAResult(parts[0].labels, *(torch.cat([getattr(p, f) for p in parts])
                                        for f in DLAResult._fields[1:]))


def summarise_dla(dla: DLAResult, control: DLAResult, n_layers: int) -> JSONDict:
    """Means and SEMs over prompts of every part, per head, per layer and of the accumulated residual."""
    mean, sem = mean_sem(dla.parts)
    control_mean, control_sem = mean_sem(control.parts)
    head_mean, head_sem = mean_sem(dla.head_parts)
    attn = [sum(mean[i] for i, label in enumerate(dla.labels) if label.startswith(f"L{l}H") or
                label == f"L{l} attn bias") for l in range(n_layers)]
    mlp = [float(mean[dla.labels.index(f"L{l} mlp")]) for l in range(n_layers) if f"L{l} mlp" in dla.labels]
    acc_mean, acc_sem = mean_sem(dla.accumulated)
    error = (dla.parts.sum(1) + dla.constant - dla.logit_diff).abs()
    return {
        "logit_diff": {"mean": float(dla.logit_diff.mean()), "sem": float(mean_sem(dla.logit_diff)[1])},
        "constant": float(dla.constant.mean()),
        "sum_error": {"max_abs": float(error.max()),
                      "max_rel": float((error / dla.logit_diff.abs().clamp_min(1e-6)).max())},
        "parts": {label: {"mean": float(m), "sem": float(s), "control_mean": float(cm), "control_sem": float(cs)}
                  for label, m, s, cm, cs in zip(dla.labels, mean, sem, control_mean, control_sem)},
        "heads": {"mean": head_mean.tolist(), "sem": head_sem.tolist()},
        "by_layer": {"attn": [float(a) for a in attn], "mlp": mlp},
        "accumulated": {"mean": acc_mean.tolist(), "sem": acc_sem.tolist(),
                        "stages": [f"resid_pre {l}" for l in range(n_layers)] + ["final"]},
    }


def write_dla_report(path: str, result: JSONDict) -> None:
    """report.md: the logit difference, how exactly the parts sum to it, and the largest parts beside the control."""
    parts = result["parts"]
    top = sorted(parts, key=lambda k: -abs(parts[k]["mean"]))[:TOP]
    lines = [f"# Direct logit attribution on {result['model']['spec']}", "",
             f"{result['n_prompts']} prompts from `{result['config']['prompts']}`; logit difference (answer − wrong) "
             f"{result['logit_diff']['mean']:.3f} ± {result['logit_diff']['sem']:.3f}.", "",
             f"The parts plus the constant ({result['constant']:+.4f}: the final norm's and unembedding's biases) sum "
             f"to the model's logit difference within {result['sum_error']['max_abs']:.2e} "
             f"(relative {result['sum_error']['max_rel']:.2e}).", "",
             "Control: the same parts projected on a random token pair's logit difference (tokens "
             f"{result['control_tokens']}).", "", "![dla](figures/dla.png)", "",
             "| part | contribution | control |", "|---|---|---|"]
    lines += [f"| {k} | {parts[k]['mean']:+.3f} ± {parts[k]['sem']:.3f} | {parts[k]['control_mean']:+.3f} ± "
              f"{parts[k]['control_sem']:.3f} |" for k in top]
    write_url_atomic(path, ("\n".join(lines) + "\n").encode())


def format_summary(result: JSONDict) -> str:
    """The logit difference, the sum check, and the three largest parts."""
    parts = result["parts"]
    top = sorted(parts, key=lambda k: -abs(parts[k]["mean"]))[:3]
    return (f"logit difference {result['logit_diff']['mean']:.3f} ± {result['logit_diff']['sem']:.3f}; parts sum "
            f"to it within {result['sum_error']['max_abs']:.1e}; largest: "
            + ", ".join(f"{k} {parts[k]['mean']:+.3f}" for k in top))
