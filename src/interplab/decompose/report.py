"""OUT/report.md of `interplab decompose`: the scores beside their controls, in a few tables."""

from __future__ import annotations

from interplab.fileio import write_url_atomic
from interplab.runs import JSONDict, JSONValue, Run


def _fmt(value: JSONValue) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_summary(metrics: JSONDict) -> str:
    """The lines `interplab decompose` prints: per target MMCS, ML2R, live/true, and the controls."""
    lines = [f"{metrics['method']} on {metrics['model']} ({metrics['settings']['steps']} steps):"]  # type: ignore[index]
    random_model = metrics.get("random_model")
    for name, layer in metrics["scores"]["layers"].items():  # type: ignore[index, union-attr]
        if not metrics["true_counts"]:  # a language model: no truth to score against
            line = (f"  {name}: live {layer['live']} of {metrics['settings']['C']}, important per token "  # type: ignore[index]
                    f"{_fmt(layer.get('mean_active'))}")
            if isinstance(random_model, dict):
                line += f"; random model: live {random_model['layers'][name]['live']}"  # type: ignore[index]
            lines.append(line)
            continue
        line = (f"  {name}: MMCS {_fmt(layer.get('mmcs'))}, ML2R {_fmt(layer.get('ml2r'))}, live {layer['live']} "
                f"(true {metrics['true_counts'].get(name)}, rank {_fmt(layer.get('true_rank'))}), "  # type: ignore[union-attr]
                f"important per input {_fmt(layer.get('mean_active'))}; "
                f"random basis MMCS {_fmt(layer.get('random_basis_mmcs'))}")
        if isinstance(random_model, dict):
            line += f", random model MMCS {_fmt(random_model['layers'][name].get('mmcs'))}"  # type: ignore[index]
        lines.append(line)
    losses = metrics["scores"]["losses"]  # type: ignore[index]
    lines.append(f"  output {'KL' if losses.get('target_vs_zero') != losses.get('target_vs_zero') else 'MSE'} "
                 "to the target: " + ", ".join(f"{k} {_fmt(v)}" for k, v in losses.items()))  # type: ignore[union-attr]
    return "\n".join(lines)


def write_report(run: Run, metrics: JSONDict) -> str:
    """Write OUT/report.md; return its path."""
    rows = ["| target | true | rank | live | important per input | MMCS | ML2R | random-basis MMCS | random-model MMCS "
            "| random-model live |", "|---|---|---|---|---|---|---|---|---|---|"]
    random_model = metrics.get("random_model")
    for name, layer in metrics["scores"]["layers"].items():  # type: ignore[index, union-attr]
        rm = random_model["layers"][name] if isinstance(random_model, dict) else {}  # type: ignore[index]
        rows.append(f"| {name} | {metrics['true_counts'].get(name)} | {_fmt(layer.get('true_rank'))} | "  # type: ignore[union-attr]
                    f"{layer['live']} | {_fmt(layer.get('mean_active'))} | {_fmt(layer.get('mmcs'))} | {_fmt(layer.get('ml2r'))} | "
                    f"{_fmt(layer.get('random_basis_mmcs'))} | {_fmt(rm.get('mmcs'))} | {_fmt(rm.get('live'))} |")
    losses = metrics["scores"]["losses"]  # type: ignore[index]
    text = "\n".join([
        f"# {metrics['method'].upper()} on {metrics['model']}",  # type: ignore[union-attr]
        "",
        "MMCS/ML2R: each true rank-1 mechanism against the subcomponent closest in direction along its input "
        "direction (1 and 1 is a perfect, unshrunk match). Live: subcomponents important on some held-out input. "
        "The random-basis and random-model columns are the controls (chance level).",
        "",
        *rows,
        "",
        "Output distance to the target on held-out inputs with all subcomponents, only the important ones, as many "
        "chosen at random (control), the important ones ablated, and none:",
        "",
        "| " + " | ".join(losses) + " |",  # type: ignore[arg-type]
        "|" + "---|" * len(losses),  # type: ignore[arg-type]
        "| " + " | ".join(_fmt(v) for v in losses.values()) + " |",  # type: ignore[union-attr]
        "",
        "![importance](figures/importance.png)",
        "",
        *(["![max cosines](figures/max_cosines.png)", ""] if "max_cosines" in metrics.get("figures", {}) else []),
    ])
    path = run.path("report.md")
    write_url_atomic(path, text.encode())
    return path
