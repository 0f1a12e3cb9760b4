"""A run report in Markdown: every SAE's headline figures beside their controls, the per-variant KL table of the main
SAE, the perturbation plateaus, and the figures (linked relative to the report, so the folder can be moved)."""

from __future__ import annotations

import math
import posixpath
from typing import Any, Mapping, Sequence

from interplab.errors import InterplabError
from interplab.evals.figures import sae_label
from interplab.fileio import write_url_atomic


def _num(v: Any, fmt: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, fmt)


def _pm(mean: Any, sem: Any) -> str:
    return f"{_num(mean)} ± {_num(sem, '.2g')}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def sae_table(evals: Sequence[Mapping[str, Any]]) -> list[str]:
    """One row per evaluated SAE: sparsity, reconstruction, downstream loss, and the KL against ε-random."""
    rows = []
    for r in evals:
        m = r["metrics"]
        b, p, s, rec = m["model_behavior"], m["model_performance"], m["sparsity"], m["reconstruction"]
        tuned, typical = m.get("scale_tuning", {}), m.get("reconstruction_typical", {})
        rows.append([sae_label(r), f"{r['n_tokens']:,}", _num(s["l0"], ".1f"), _num(rec["fvu"]),
                     _num(typical.get("fvu")),
                     _num(p["ce_loss_score"]), _pm(b["kl_div_with_sae"], b["kl_div_with_sae_sem"]),
                     _pm(m["kl"]["epsilon_random"]["mean"], m["kl"]["epsilon_random"]["sem"]),
                     _pm(b["kl_ratio"], b["kl_ratio_sem"]), _num(tuned.get("gap_closed"), ".1%")])
    return _table(["SAE", "tokens", "L0", "FVU", "FVU without massive tokens", "CE loss recovered", "KL(SAE)",
                   "KL(ε-random)", "kl_ratio", "gap closed by decoder scales"], rows)


def variant_table(result: Mapping[str, Any]) -> list[str]:
    """Every spliced variant of one evaluation: mean KL ± SEM and CE loss."""
    m = result["metrics"]
    rows = [["clean", "0", _num(m["ce_loss"]["clean"]["mean"])]]
    rows += [[name, _pm(k["mean"], k["sem"]), _num(m["ce_loss"][name]["mean"])] for name, k in m["kl"].items()]
    return _table(["variant", "KL(clean ‖ variant) [nats]", "CE loss"], rows)


def plateau_table(perturb: Mapping[str, Any]) -> list[str]:
    """Per target kind and start (real or synthetic activation): the step at which KL first exceeds the threshold
    (median, and mean ± SEM, over the pairs that cross) and the share of pairs that never cross."""
    rows = []
    for kind, by_start in perturb["plateau"].items():
        for start, p in by_start.items():
            rows.append([kind, start, _num(p.get("median")), _pm(p.get("mean"), p.get("sem")),
                         _num(p.get("fraction_never_crossing"), ".1%")])
    first = next((p for by_start in perturb["plateau"].values() for p in by_start.values()), {})
    note = (f"Steps in units of the median ‖x‖ at the hook ({_num(perturb.get('step_unit'))}); KL threshold "
            f"{_num(first.get('threshold'))} nats; {perturb.get('n_pairs', '?')} pairs per target kind.")
    return [note, "", *_table(["target", "start", "plateau step (median)", "mean ± SEM", "never crossed"], rows)]


def _link(report_path: str, figure: str) -> str:
    """The figure's path relative to the report's folder when both are local; else as given."""
    if "://" in figure or "://" in report_path:
        return figure
    return posixpath.relpath(figure, posixpath.dirname(report_path) or ".")


def write_eval_report(path: str, evals: Sequence[Mapping[str, Any]], *, figures: Mapping[str, str] | None = None,
                      perturb: Mapping[str, Any] | None = None, title: str = "interplab evaluation",
                      preamble: Sequence[str] = ()) -> str:
    """Write the Markdown report to `path` (atomically) and return `path`. `evals[0]` is the main SAE."""
    if not evals:
        raise InterplabError("a report needs at least one evaluation result")
    main = evals[0]
    lines = [f"# {title}", "", *preamble, "",
             f"Model `{main['config']['model']}`, hook `{main['config']['hook']}`, corpus `{main['config']['corpus']}`"
             f" ({main['config']['split']} split). Every KL is the mean over tokens (BOS excluded) ± its standard "
             "error; `kl_ratio` = KL(SAE) / KL(ε-random), where ε-random is an error of the SAE's norm in a random "
             "direction.", "", "## SAEs", "", *sae_table(evals), f"## Variants of {sae_label(main)}", "",
             *variant_table(main)]
    if "scale_tuning" in main["metrics"]:
        t = main["metrics"]["scale_tuning"]
        lines += ["## Decoder-scale fine-tuning", "",
                  f"Scales per {t['per']} fitted on {t['n_tokens_tuned']:,} train-split tokens "
                  f"({'held out from' if t['held_out'] else 'NOT held out from'} the evaluation tokens): KL "
                  f"{_num(t['kl_div_with_sae'])} → {_num(t['kl_div_with_sae_scale_tuned'])}, closing "
                  f"{_num(t['gap_closed'], '.1%')} of the gap to ε-random; tuned kl_ratio "
                  f"{_pm(t['kl_ratio_tuned'], t['kl_ratio_tuned_sem'])}, FVU {_num(t['fvu_tuned'])}.", ""]
    if perturb is not None:
        lines += ["## Activation plateaus", "", *plateau_table(perturb)]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({_link(path, fig)})\n" for name, fig in figures.items()]
    write_url_atomic(path, ("\n".join(lines) + "\n").encode())
    return path
