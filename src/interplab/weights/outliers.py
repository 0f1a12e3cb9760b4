"""`interplab weights outliers`: residual-stream outlier dimensions, per layer, each beside a rotated-basis control.

One streaming pass over a corpus reads the residual stream at every stage s ∈ {embed = blocks.0.hook_resid_pre,
blocks.0.hook_resid_post, ..., blocks.{L-1}.hook_resid_post} and keeps running statistics only (memory does not
grow with the token budget, apart from the capped list of candidate massive values). Per stage s and dim d, over
the N tokens seen:

    max |x_d|, with the (context, position, token) where it occurs
    mean |x_d| = Σ|x_d| / N,  mean x_d,  var x_d = Σx_d²/N − (mean x_d)²       (float64 sums; see 2. for N)
    c_d = mean of x_d / ‖x‖                      (Timkey & van Schijndel 2021: the expected cosine similarity of
                                                  two independent tokens is Σ_d c_d², dim d's share is c_d² / Σ c²)
    median |x| of the stage over all (token, dim) values: read from a histogram whose bins are the top 16 bits of
    the float32 pattern of |x| (log-spaced, each spanning a factor ≤ 1 + 2^-7), linear inside the bin, so the
    estimate is within 0.8% of the exact median.

Two kinds of outliers, both standard in the literature:

1. Massive activations (Sun, Chen, Kolter & Liu 2024, "Massive Activations in Large Language Models"): single
   (token, dim) values with |x| > massive_abs (100) and |x| > massive_ratio (1000) × the stage's median |x|.
   The ratio test needs the final median, so during the pass the values above massive_abs and above half the
   ratio threshold of the running median are recorded (at most max_records of them), and both criteria are
   applied at the end; `records.complete` says whether anything could have been missed. Reported: the dims, the
   stages they span, the per-stage max, and the tokens carrying them — distinct (context, position) carriers,
   split into position 0, delimiters (whitespace/punctuation-only or special tokens) and other, with the top
   token strings and positions.
2. Rogue / outlier dimensions (Timkey & van Schijndel 2021, "All bark and no bite"; Kovaleva et al. 2021, "BERT
   busters"): dim d is rogue at stage s when mean|x_d| ≥ rogue_factor (10) × the stage's average over dims of
   mean|x_d'|; it is a *consistent* rogue dim when that holds at ≥ rogue_layers (50%) of the stages. Each is
   reported with its cosine-similarity share c_d²/Σc² and variance share var_d/Σvar. These means (and mean x_d,
   var x_d, c_d) are taken over positions ≥ 1 unless rogue_skip_first is off: otherwise one massive value at the
   first token (2.5e4 in SmolLM2, /ctx_len) would dominate the mean |x_d| of its dim.

The control: outlier dimensions are a claim about a privileged basis. The same statistics are computed on the same
activations in a random orthonormal basis y = x Q (Q: QR of a seeded Gaussian matrix, signs fixed so Q is Haar),
in the same pass. Per stage, basis_ratio = max_d max|x_d| / max_k max|y_k|. Rotation preserves norms, so an
isotropic cloud gives a ratio near 1, while a spike of size M in one dim d* is spread over the rotated coordinates
as M·Q[d*, :], giving spike_ratio = 1 / max_k |Q[d*, k]| ≈ sqrt(d / (2 ln d)) (≈ 6.6 for d = 576; reported per
layer for its top dim, computed from the actual Q). A stage counts as holding a basis-aligned outlier when
basis_ratio ≥ aligned_ratio (3). The rogue criterion is read in the rotated basis too (largest mean|y_k| over the
stage average), and so are the massive values (with the rotated median): a spike large enough stays massive after
rotation, but spread over many coordinates instead of a few dims, so the report gives how many coords carry them.

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json, OUT/figures/outlier_magnitudes.png and
OUT/figures/massive_tokens.png.
"""

from __future__ import annotations

import itertools
import math
import string
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.models.tokens import token_text
from interplab.runs import JSONDict, Run
from interplab.weights.configs import OutliersConfig
from interplab.weights.outlier_figures import magnitude_figure, massive_tokens_figure
from interplab.weights.outlier_stats import HIST_BINS, BasisStats, collect_stats, random_rotation

KIND = "weights outliers"
"""The command, as recorded in config.json and metrics.json."""


# ---- the run ---------------------------------------------------------------------------------------------------
def corpus_contexts(cfg: OutliersConfig, model: HookedModel) -> Int[torch.Tensor, "n ctx"]:
    """The first tokens // ctx_len contexts of the corpus split, stacked."""
    if model.tokenizer is None:
        raise InterplabError(f"{model.info.spec} has no tokenizer, so it cannot read a text corpus")
    n = cfg.tokens // cfg.ctx_len
    contexts = list(itertools.islice(iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split=cfg.split,
                                                   seed=cfg.seed, prepend_bos=cfg.prepend_bos), n))
    if not contexts:
        raise InterplabError(f"corpus {cfg.corpus!r} ({cfg.split} split) holds no context of {cfg.ctx_len} tokens")
    if len(contexts) < n:
        print(f"note: the corpus ran out after {len(contexts)} of {n} contexts")
    return torch.stack(contexts)


def run_outliers(cfg: OutliersConfig, *, model: HookedModel | None = None,
                 contexts: Int[torch.Tensor, "n ctx"] | None = None, progress: bool = True) -> JSONDict:
    """Stream the corpus (or `contexts`, e.g. for a model without tokenizer) through the model, write
    OUT/metrics.json and the figures, return the metrics. A complete run with the same config in OUT is reported as
    done, not recomputed."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not recompute
            return run.metrics
        model = model or load_model(cfg.model, device=cfg.device)
        if cfg.ctx_len > model.info.n_ctx:
            raise InterplabError(f"--ctx-len {cfg.ctx_len} is longer than {model.info.spec} allows "
                                 f"({model.info.n_ctx})")
        if contexts is None:
            contexts = corpus_contexts(cfg, model)
        elif contexts.ndim != 2 or contexts.shape[1] != cfg.ctx_len:
            raise InterplabError(f"contexts must have shape [n, ctx_len={cfg.ctx_len}], got {tuple(contexts.shape)}")
        start = time.perf_counter()
        rotation = random_rotation(model.info.d_model, cfg.seed)
        batches = tqdm(contexts.split(cfg.batch_size), unit="batch", desc="outliers", disable=not progress)
        std, rot, n_tokens = collect_stats(model, batches, rotation, cfg)
        result = summarise(std, rot, rotation, contexts.cpu(), cfg, model.tokenizer)
        result.update(config=asdict(cfg), model=model.info.to_dict(), n_tokens=n_tokens,
                      seconds=time.perf_counter() - start)
        result["figures"] = {"magnitudes": magnitude_figure(result, run.figure("outlier_magnitudes")),
                             "massive_tokens": massive_tokens_figure(result, run.figure("massive_tokens"))}
        run.write_metrics(result)
        return {"kind": KIND, **result}


# ---- from statistics to the report -----------------------------------------------------------------------------
def is_delimiter(tokenizer: Any, token: int) -> bool:
    """Whitespace- or punctuation-only text, or a special token (BOS, EOS, ...)."""
    if tokenizer is None:
        return False
    if token in set(getattr(tokenizer, "all_special_ids", [])):
        return True
    return all(c.isspace() or c in string.punctuation for c in tokenizer.decode([token]))


def massive_values(stats: BasisStats, median: torch.Tensor, cfg: OutliersConfig
                   ) -> tuple[Int[torch.Tensor, "r 4"], Float[torch.Tensor, " r"]]:
    """The recorded values passing both massive criteria (rows: stage, dim, stream index, token)."""
    rows, values = stats.recorded()
    keep = (values.abs() > cfg.massive_abs) & (values.abs() > cfg.massive_ratio * median[rows[:, 0]].float())
    return rows[keep], values[keep]


def summarise(std: BasisStats, rot: BasisStats, rotation: Float[torch.Tensor, "d d"], contexts: torch.Tensor,
              cfg: OutliersConfig, tokenizer: Any) -> dict[str, Any]:
    """Per-layer tables, massive activations and their carriers, rogue dims, the control, and the verdict."""
    ctx_len = contexts.shape[1]
    n_stages = std.max_abs.shape[0]
    labels = ["embed"] + [str(layer) for layer in range(n_stages - 1)]
    med, rot_med = std.median_abs(), rot.median_abs()
    max_abs, rot_max_abs = std.max_abs.cpu(), rot.max_abs.cpu()
    mean_abs, rot_mean_abs = std.mean_abs(), rot.mean_abs()
    mean, var, cos = std.mean(), std.var(), std.cos_contrib()
    rogue_ratio = mean_abs / mean_abs.mean(1, keepdim=True)
    rot_rogue_ratio = rot_mean_abs / rot_mean_abs.mean(1, keepdim=True)
    massive, massive_vals = massive_values(std, med, cfg)
    rot_massive, _ = massive_values(rot, rot_med, cfg)
    spike = 1 / rotation.abs().max(1).values  # basis_ratio of a pure spike along each standard dim
    where = lambda index: {"context": int(index) // ctx_len, "position": int(index) % ctx_len}  # noqa: E731

    layers = []
    for s in range(n_stages):
        top = max_abs[s].topk(min(cfg.top, max_abs.shape[1])).indices.tolist()
        dims = [{"dim": d, "max_abs": float(max_abs[s, d]), "value": float(std.max_value[s, d]),
                 **where(std.max_index[s, d]), "token": token_text(tokenizer, int(std.max_token[s, d])),
                 "mean_abs": float(mean_abs[s, d]), "mean": float(mean[s, d]), "std": math.sqrt(float(var[s, d]))}
                for d in top]
        rogue = (rogue_ratio[s] >= cfg.rogue_factor).nonzero()[:, 0].tolist()
        layers.append({
            "layer": labels[s], "top_dims": dims, "max_abs": dims[0]["max_abs"], "median_abs": float(med[s]),
            "max_over_median": dims[0]["max_abs"] / float(med[s]),
            "rotated_max_abs": float(rot_max_abs[s].max()), "rotated_median_abs": float(rot_med[s]),
            "basis_ratio": dims[0]["max_abs"] / float(rot_max_abs[s].max()),
            "spike_ratio": float(spike[top[0]]),
            "n_massive": int((massive[:, 0] == s).sum()), "rotated_n_massive": int((rot_massive[:, 0] == s).sum()),
            "rogue_dims": [{"dim": d, "mean_abs_ratio": float(rogue_ratio[s, d]),
                            "cos_share": float(cos[s, d] / cos[s].sum()), "var_share": float(var[s, d] / var[s].sum())}
                           for d in sorted(rogue, key=lambda d: -float(rogue_ratio[s, d]))],
            "rotated_max_mean_abs_ratio": float(rot_rogue_ratio[s].max()),
            "anisotropy": float(cos[s].sum()),
        })
    figure_dims = max_abs.max(0).values.topk(min(cfg.top, max_abs.shape[1])).indices.tolist()
    rogue_counts = (rogue_ratio >= cfg.rogue_factor).sum(0)
    consistent = (rogue_counts >= math.ceil(cfg.rogue_layers * n_stages)).nonzero()[:, 0].tolist()
    result = {
        "layers": layers,
        "massive": massive_summary(massive, massive_vals, contexts, labels, tokenizer),
        "rotated_n_massive": len(rot_massive), "rotated_n_massive_dims": len(rot_massive[:, 1].unique()),
        "records": {"candidates": std.n_candidates, "recorded": std.n_recorded, "complete": std.records_complete(),
                    "rotated_candidates": rot.n_candidates, "rotated_complete": rot.records_complete()},
        "rogue_dims": [{"dim": d, "n_layers": int(rogue_counts[d]),
                        "peak_mean_abs_ratio": float(rogue_ratio[:, d].max())}
                       for d in sorted(consistent, key=lambda d: -float(rogue_ratio[:, d].max()))],
        "curves": {"layers": labels, "dims": figure_dims,
                   "max_abs": {str(d): max_abs[:, d].tolist() for d in figure_dims},
                   "rotated_max_abs": rot_max_abs.max(1).values.tolist(), "median_abs": med.tolist(),
                   "mean_abs_ratio": {str(d): rogue_ratio[:, d].tolist() for d in figure_dims},
                   "rotated_max_mean_abs_ratio": rot_rogue_ratio.max(1).values.tolist()},
        "median_method": f"histogram of |x| over {HIST_BINS} log-spaced bins (float32 exponent and top 7 mantissa "
                         f"bits): within a factor {1 + 2 ** -7:.4f} of the exact median",
    }
    result["verdict"] = verdict(result, cfg)
    return result


def massive_summary(rows: torch.Tensor, values: torch.Tensor, contexts: torch.Tensor, labels: list[str],
                    tokenizer: Any) -> dict[str, Any]:
    """Massive values by dim, and their carriers: distinct (context, position) tokens holding at least one."""
    ctx_len = contexts.shape[1]
    by_dim = []
    for d in rows[:, 1].unique().tolist():
        mine = rows[:, 1] == d
        stages = rows[mine, 0]
        by_dim.append({"dim": d, "count": int(mine.sum()), "first_layer": labels[int(stages.min())],
                       "last_layer": labels[int(stages.max())], "n_layers": len(stages.unique()),
                       "peak_abs": float(values[mine].abs().max())})
    by_dim.sort(key=lambda r: -r["count"])
    carriers = rows[:, 2].unique()
    positions = (carriers % ctx_len).tolist()
    tokens = contexts.reshape(-1)[carriers].tolist()
    kinds = Counter("position 0" if p == 0 else "delimiter" if is_delimiter(tokenizer, t) else "other"
                    for p, t in zip(positions, tokens))
    n = max(len(carriers), 1)
    flat = contexts.reshape(-1)
    later = [int(c) for c in carriers if c % ctx_len]  # the carriers past position 0, with the token before each
    peaks = {c: float(values[rows[:, 2] == c].abs().max()) for c in later}
    examples = [{"context": c // ctx_len, "position": c % ctx_len, "token": token_text(tokenizer, int(flat[c])),
                 "previous": token_text(tokenizer, int(flat[c - 1])), "peak_abs": peaks[c],
                 "dims": rows[rows[:, 2] == c, 1].unique().tolist()}
                for c in sorted(later, key=lambda c: -peaks[c])[:20]]
    return {
        "n_values": len(rows), "n_carriers": len(carriers), "dims": by_dim,
        "share_position_0": kinds["position 0"] / n, "share_delimiter": kinds["delimiter"] / n,
        "share_other": kinds["other"] / n,
        "positions": [{"position": p, "count": c} for p, c in Counter(positions).most_common(20)],
        "tokens": [{"token": token_text(tokenizer, t), "id": t, "count": c}
                   for t, c in Counter(tokens).most_common(20)],
        "later_carriers": examples,
    }


def verdict(result: Mapping[str, Any], cfg: OutliersConfig) -> str:
    """One line: the massive activations and their carriers, the rotated-basis control, the consistent rogue dims."""
    layers, massive = result["layers"], result["massive"]
    aligned = [r["layer"] for r in layers if r["basis_ratio"] >= cfg.aligned_ratio]
    best = max(layers, key=lambda r: r["basis_ratio"])
    control = (f"max |act| / rotated-basis max up to {best['basis_ratio']:.1f}x (layer {best['layer']}), "
               f"basis-aligned (>= {cfg.aligned_ratio:g}x) at {len(aligned)}/{len(layers)} layers")
    if massive["n_values"]:
        dims = ", ".join(str(r["dim"]) for r in massive["dims"][:5])
        top = massive["tokens"][0]["token"]
        rotated = (f"{result['rotated_n_massive']:,} values spread over {result['rotated_n_massive_dims']} coords"
                   if result["rotated_n_massive"] else "none")
        head = (f"massive activations in dim(s) {dims}: {massive['n_values']:,} values on {massive['n_carriers']:,} "
                f"tokens ({massive['share_position_0']:.0%} at position 0, {massive['share_delimiter']:.0%} "
                f"delimiters; top token {top!r}); rotated basis: {rotated}")
    else:
        peak = max(layers, key=lambda r: r["max_over_median"])
        head = (f"no massive activations (largest max/median {peak['max_over_median']:.0f}x at layer "
                f"{peak['layer']}, max |act| {peak['max_abs']:.3g})")
    rogue = ", ".join(str(r["dim"]) for r in result["rogue_dims"][:5]) or "none"
    return f"{head}; {control}; consistent rogue dims: {rogue}"


def format_summary(result: Mapping[str, Any]) -> str:
    """A per-layer table of the top dim, its carrier, the median, the rotated control and the massive count."""
    cfg = result["config"]
    lines = [f"{result['model']['spec']}: {result['n_tokens']:,} tokens of {cfg['corpus']} "
             f"(pass {result['seconds']:.1f} s); massive = |act| > {cfg['massive_abs']:g} and > "
             f"{cfg['massive_ratio']:g}x the layer median",
             f"{'layer':>5} {'dim':>5} {'max|act|':>9} {'token@pos':>18} {'median':>8} {'max/med':>8} "
             f"{'rot max':>8} {'std/rot':>7} {'spike':>5} {'massive':>8} rogue dims"]
    for r in result["layers"]:
        d = r["top_dims"][0]
        carrier = f"{d['token']!r}@{d['position']}"
        rogue = ",".join(str(x["dim"]) for x in r["rogue_dims"][:4])
        lines.append(f"{r['layer']:>5} {d['dim']:>5} {r['max_abs']:>9.3g} {carrier[-18:]:>18} {r['median_abs']:>8.3g} "
                     f"{r['max_over_median']:>8.3g} {r['rotated_max_abs']:>8.3g} {r['basis_ratio']:>7.2f} "
                     f"{r['spike_ratio']:>5.1f} {r['n_massive']:>8,} {rogue}")
    m = result["massive"]
    if m["n_values"]:
        lines.append("massive dims: " + "; ".join(
            f"{r['dim']} ({r['count']:,} values, layers {r['first_layer']}–{r['last_layer']}, peak {r['peak_abs']:.3g})"
            for r in m["dims"][:5]))
        lines.append("carrier tokens: " + ", ".join(f"{t['token']!r} x{t['count']}" for t in m["tokens"][:8])
                     + "; positions: " + ", ".join(f"{p['position']} x{p['count']}" for p in m["positions"][:8]))
        if m["later_carriers"]:
            lines.append("past position 0 (token after previous): " + ", ".join(
                f"{e['token']!r} after {e['previous']!r} @{e['position']} ({e['peak_abs']:.3g})"
                for e in m["later_carriers"][:6]))
    records = result["records"]
    if not records["complete"]:
        lines.append(f"note: {records['recorded']:,} of {records['candidates']:,} candidate values recorded, or a "
                     f"layer's median fell during the pass: massive counts may be incomplete (raise --max-records)")
    lines.append("verdict: " + result["verdict"])
    lines += [f"figure: {p}" for p in result.get("figures", {}).values()]
    return "\n".join(lines)
