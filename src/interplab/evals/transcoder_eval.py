"""`interplab transcoder eval`: transcoders spliced in place of their MLPs, scored as `sae eval` scores an SAE.

Per-layer transcoders (a folder, or a set of one per layer) or a cross-layer transcoder (CLT: circuit-tracer's CLT
folder, as `interplab transcoder train` writes it, where ŷ_l reads the features of every layer ≤ l), both behind
`interplab.sae.mlp_dictionary`. Below, T_l(x_l) stands for ŷ_l from the features of its source layers.

Per batch of held-out contexts the model runs once clean (every covered MLP's input x_l and output y_l read on the
way). Then, for each evaluated layer l ALONE (a prefix up to `blocks.{l}.hook_mlp_out`, one suffix per variant):

    transcoder       ŷ_l = T_l(x_l) in place of y_l (a CLT's from the clean x_0..x_l)
    epsilon_random   y_l + ‖y_l − ŷ_l‖·u, u a fresh random unit vector per token: the transcoder's error norm at random
    zero_ablation    0 (the MLP's contribution removed)

and, with `full_replacement`, every covered layer at once in one forward pass (see `replacement`): transcoder,
with_errors (ŷ_l plus the clean run's error e_l: equal to the model), epsilon_random at every layer, zero_ablation
of every covered MLP.

Reported per layer: KL(clean ‖ spliced) per position 1..T−1 and next-token CE from positions 1..T−2, each as mean ±
SEM; kl_ratio = KL_transcoder / KL_ε-random (paired delta-method SEM); ce_loss_score = (CE_zero − CE_tc) /
(CE_zero − CE_clean); the reconstruction of the MLP output (fvu = mean ‖y − ŷ‖² / mean ‖y − ȳ‖², mse, cossim,
norms); L0 (mean active latents per token), dead latents (never ≠ 0 on the evaluation tokens); a CLT's are those of
its layer-l features. For the full
replacement: the same KL/CE per variant and, per layer, the fvu of the transcoder at the inputs the replacement
itself produces (errors compounded). BOS (position 0) is never replaced and never counted, as in `sae eval`.
Writes a run folder (`interplab.runs`): config.json, metrics.json ("dictionary": "per_layer" | "crosslayer"),
report.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.evals.configs import TranscoderEvalConfig
from interplab.evals.eval_summary import Moments
from interplab.evals.metrics import (
    CleanLogProbs, FiringCounts, ce_loss_recovered, clean_log_probs, firing_counts, kl_and_ce_per_token,
    mean_and_sem, ratio_with_sem,
)
from interplab.evals.replacement import IN_HOOK, OUT_HOOK, SPLICES, clean_run, replacement_logits, splice_output
from interplab.fileio import list_files, open_url, write_url_atomic
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.runs import JSONDict, Run, finite_json
from interplab.sae.crosslayer import CrossLayerTranscoder
from interplab.sae.layout import CFG_FILE
from interplab.sae.mlp_dictionary import DictionarySource, MLPDictionary, as_dictionary, clt_model_name
from interplab.sae.transcoder import TranscoderSet
from interplab.sae.transcoder_files import load_transcoder, load_transcoder_set

__all__ = ["KIND", "LAYER_VARIANTS", "REPLACEMENT_VARIANTS", "evaluate_transcoders", "format_summary",
           "run_transcoder_eval"]

KIND = "transcoder eval"
LAYER_VARIANTS = ("transcoder", "epsilon_random", "zero_ablation")
"""What is spliced at one layer's hook_mlp_out when that layer is evaluated alone."""
REPLACEMENT_VARIANTS = SPLICES
"""What is spliced at every covered layer at once in the full replacement."""


class Tally:
    """Per-token KL and CE of each variant (BOS left out), concatenated at the end."""

    def __init__(self, variants: tuple[str, ...]):
        self.kl: dict[str, list[Tensor]] = {v: [] for v in variants}
        self.ce: dict[str, list[Tensor]] = {v: [] for v in ("clean", *variants)}

    def add(self, name: str, kl_tok: Tensor, ce_tok: Tensor) -> None:
        if name != "clean":
            self.kl[name].append(kl_tok[:, 1:].flatten().double().cpu())
        self.ce[name].append(ce_tok[:, 1:].flatten().double().cpu())

    def summary(self, main: str) -> dict[str, Any]:
        """KL and CE (mean ± SEM) of every variant, and the scores of variant `main` against the controls."""
        kl = {k: torch.cat(v) for k, v in self.kl.items()}
        ce = {k: torch.cat(v) for k, v in self.ce.items()}
        kl_stats = {k: mean_and_sem(v)._asdict() for k, v in kl.items()}
        ce_stats = {k: mean_and_sem(v)._asdict() for k, v in ce.items()}
        try:
            ratio = ratio_with_sem(kl[main], kl["epsilon_random"])._asdict()
        except InterplabError:  # ε-random KL is 0 (an exact transcoder): the ratio is undefined
            ratio = {"mean": math.nan, "sem": math.nan}
        kl_zero, kl_main = kl_stats["zero_ablation"]["mean"], kl_stats[main]["mean"]
        ce_m = {k: v["mean"] for k, v in ce_stats.items()}
        return {"kl": kl_stats, "ce_loss": ce_stats, "kl_ratio": ratio,
                "kl_div_score": (kl_zero - kl_main) / kl_zero if abs(kl_zero) > 1e-12 else math.nan,
                "ce_loss_score": ce_loss_recovered(ce_m["clean"], ce_m[main], ce_m["zero_ablation"])}


class LayerTally(Tally):
    """A Tally plus the transcoder's reconstruction and sparsity on the evaluation tokens."""

    def __init__(self, d_sae: int):
        super().__init__(LAYER_VARIANTS)
        self.moments = Moments()
        self.counts = FiringCounts(0, torch.zeros(d_sae, dtype=torch.long))
        self.l0_sum = self.err_norm_sum = 0.0

    def add_codes(self, y: Tensor, y_hat: Tensor, f: Tensor) -> None:
        """y, ŷ [n d] and codes f [n d_sae] of the non-BOS tokens of a batch."""
        self.moments.add(y, y_hat)
        fired = firing_counts(f)
        self.counts = self.counts.merge(FiringCounts(fired.n_tokens, fired.counts.cpu()))
        self.l0_sum += (f != 0).sum().item()
        self.err_norm_sum += (y.double() - y_hat.double()).norm(dim=-1).sum().item()

    def layer_summary(self, about: Mapping[str, Any]) -> dict[str, Any]:
        """`about` (hooks, arch, d_sae, skip: `MLPDictionary.describe`) and the layer's metrics."""
        n = self.moments.n
        dead = int((self.counts.counts == 0).sum())
        return {**about, **self.summary("transcoder"),
                "reconstruction": {**self.moments.metrics(), "error_norm": self.err_norm_sum / n},
                "sparsity": {"l0": self.l0_sum / n, "dead_latents": dead, "dead_fraction": dead / about["d_sae"]}}


@torch.no_grad()
def _splice_layer(model: HookedModel, tokens: Tensor, layer: int, f: Tensor, y_hat: Tensor, clean_lp: CleanLogProbs,
                  tally: LayerTally, gen: torch.Generator) -> None:
    """One batch of `layer` alone: every LAYER_VARIANT through one shared prefix. `f` [B T d_sae], `y_hat`
    [B T d]: the layer's features and predicted output on the clean run's MLP inputs."""
    prefix = model.run_prefix(tokens, OUT_HOOK.format(layer=layer))                 # prefix.act = y_l [B T d]
    for name in LAYER_VARIANTS:
        logits = model.run_suffix(prefix, splice_output(name, prefix.act, y_hat, gen=gen))
        tally.add(name, *kl_and_ce_per_token(clean_lp, logits, tokens))
    d = y_hat.shape[-1]
    tally.add_codes(prefix.act[:, 1:].float().reshape(-1, d), y_hat[:, 1:].reshape(-1, d),
                    f[:, 1:].reshape(-1, f.shape[-1]))


@torch.no_grad()
def evaluate_transcoders(model: HookedModel, transcoders: DictionarySource, batches: Iterable[Tensor], *,
                         layers: list[int] | None = None, full_replacement: bool = True, seed: int = 0,
                         progress: bool = False) -> JSONDict:
    """Splice each covered layer alone (those of `layers`, default all) and, with `full_replacement`, all at once,
    on token batches [B T] (BOS at position 0); return {"dictionary", "n_contexts", "n_tokens", "layers": {l: ...},
    "replacement"}.

    `transcoders`: a `TranscoderSet`, a dict {layer: Transcoder}, one `Transcoder`, a `CrossLayerTranscoder` or a
    wrapped `MLPDictionary` (see `mlp_dictionary.as_dictionary`); computed in float32 (converted in place).
    """
    dic = as_dictionary(transcoders).float()
    dic.check(model)
    single = dic.layers if layers is None else sorted(layers)
    missing = [l for l in single if l not in dic.layers]
    if missing:
        raise InterplabError(f"no transcoder for layer(s) {missing}; the transcoders cover {dic.layers}")
    sources = sorted({i for l in single for i in dic.sources(l)})
    tallies = {l: LayerTally(dic.d_sae(l)) for l in single}
    repl = Tally(REPLACEMENT_VARIANTS) if full_replacement else None
    repl_moments = {l: Moments() for l in dic.layers}
    gen_layer = torch.Generator(device=model.device).manual_seed(seed)
    gen_repl = torch.Generator(device=model.device).manual_seed(seed + 1)
    n_contexts = n_tokens = 0
    max_diff = 0.0  # with_errors vs clean logits: 0 up to rounding, by construction
    for tokens in tqdm(batches, desc="transcoder eval", unit="batch", disable=not progress):
        tokens = model.check_tokens(tokens)
        clean = clean_run(model, tokens, dic.layers)
        clean_lp = clean_log_probs(clean.logits)
        clean_ce = -clean_lp.logp[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)   # [B T-1]
        for tally in [*tallies.values(), *([repl] if repl else [])]:
            tally.add("clean", clean_ce, clean_ce)
        clean_pass = dic.new_pass()
        for l in sources:  # ascending, so each ŷ_l is complete when its layer comes
            f = clean_pass.read(l, clean.inputs[l])
            if l in tallies:
                _splice_layer(model, tokens, l, f, clean_pass.output(l), clean_lp, tallies[l], gen_layer)
        if repl is not None:
            for name in REPLACEMENT_VARIANTS:
                logits = replacement_logits(model, tokens, dic, name, clean=clean, gen=gen_repl,
                                            moments=repl_moments if name == "transcoder" else None)
                repl.add(name, *kl_and_ce_per_token(clean_lp, logits, tokens))
                if name == "with_errors":
                    max_diff = max(max_diff, (logits[:, 1:].float() - clean.logits[:, 1:].float()).abs().max().item())
        n_contexts += tokens.shape[0]
        n_tokens += tokens.shape[0] * (tokens.shape[1] - 1)
    if n_contexts == 0:
        raise InterplabError("no token batch to evaluate on")
    result: dict[str, Any] = {
        "dictionary": dic.kind, "n_contexts": n_contexts, "n_tokens": n_tokens, "bos_excluded": True,
        "layers": {str(l): tallies[l].layer_summary(dic.describe(l)) for l in single},
        "replacement": None,
    }
    if repl is not None:
        result["replacement"] = {
            "layers": dic.layers, "complete": len(dic.layers) == model.info.n_layers, **repl.summary("transcoder"),
            "fvu_in_replacement": {str(l): m.metrics()["fvu"] for l, m in repl_moments.items()},
            "max_abs_logit_diff_with_errors": max_diff,
        }
    return finite_json(result)


def run_transcoder_eval(cfg: TranscoderEvalConfig, *, transcoders: DictionarySource | None = None,
                        model: HookedModel | None = None, progress: bool = True) -> JSONDict:
    """Evaluate the transcoders of cfg.transcoders (or those passed in) on held-out text; write OUT/metrics.json and
    OUT/report.md; return the metrics. A complete run with the same config in OUT is reported, not recomputed."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:
            return run.metrics
        dic = as_dictionary(transcoders) if transcoders is not None else _load_transcoders(cfg.transcoders)
        spec = cfg.model or dic.model_name
        if model is None and not spec:
            raise InterplabError(f"the transcoders in {cfg.transcoders} record no model; pass --model")
        model = model or load_model(spec, device=cfg.device)
        dic.check(model)
        _check_model(cfg, model)
        missing = [l for l in cfg.layers if l not in dic.layers]
        if missing:
            raise InterplabError(f"--layers {missing}: no transcoder there; the transcoders cover {dic.layers}")
        dic = dic.to(model.device)
        contexts = iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split=cfg.split, seed=cfg.seed,
                                 test_fraction=cfg.test_fraction)
        contexts = list(itertools.islice(contexts, cfg.tokens // cfg.ctx_len))
        if not contexts:
            raise InterplabError(f"corpus {cfg.corpus!r} ({cfg.split} split) yields no context of {cfg.ctx_len} "
                                 "tokens")
        batches = [torch.stack(contexts[i:i + cfg.batch_size]) for i in range(0, len(contexts), cfg.batch_size)]
        result = evaluate_transcoders(model, dic, batches, layers=cfg.layers or None,
                                      full_replacement=cfg.full_replacement, seed=cfg.seed, progress=progress)
        result = {"config": asdict(cfg), "model": model.info.to_dict(), **result}
        result["report"] = run.path("report.md")
        write_url_atomic(result["report"], report_markdown(result).encode())
        run.write_metrics(result)
        return {"kind": KIND, **result}


def _check_model(cfg: TranscoderEvalConfig, model: HookedModel) -> None:
    if cfg.ctx_len > model.info.n_ctx:
        raise InterplabError(f"--ctx-len {cfg.ctx_len} is longer than {model.info.spec} allows ({model.info.n_ctx})")
    if model.tokenizer is None:
        raise InterplabError(f"{model.info.spec} has no tokenizer, so it cannot read a text corpus")


def _load_transcoders(path: str) -> MLPDictionary:
    """One transcoder folder (it holds cfg.json), a set folder (one per layer, or circuit-tracer's) or a CLT folder
    (circuit-tracer's, whose config.yaml records the model)."""
    fs, root = open_url(path)
    if CFG_FILE in list_files(fs, root):
        transcoder = load_transcoder(path)
        return as_dictionary(TranscoderSet({transcoder.layer: transcoder}, IN_HOOK, OUT_HOOK))
    loaded = load_transcoder_set(path)
    return as_dictionary(loaded, clt_model_name(path) if isinstance(loaded, CrossLayerTranscoder) else "")


def _num(v: Any, fmt: str = ".4g") -> str:
    return "nan" if v is None else format(v, fmt)


def _pm(stat: Mapping[str, Any]) -> str:
    return f"{_num(stat['mean'])} ± {_num(stat['sem'], '.2g')}"


def format_summary(result: Mapping[str, Any]) -> str:
    """Per layer: L0, dead latents, FVU, KL of the transcoder beside ε-random and zero ablation, CE; then the full
    replacement's KL and CE per variant."""
    cfg = result.get("config", {})
    what = ("a cross-layer transcoder (ŷ_l from the features of layers ≤ l)" if result.get("dictionary") ==
            "crosslayer" else "transcoders")
    lines = [f"{result.get('model', {}).get('spec', '?')}: {what} spliced in place of the MLP output on "
             f"{result['n_tokens']} tokens of {cfg.get('corpus', '?')} ({cfg.get('split', '?')}); "
             "KL(clean ‖ spliced) in nats, mean ± SEM",
             f"{'layer':>5} {'d_sae':>6} {'L0':>7} {'dead':>6} {'FVU':>7} {'KL transcoder':>20} "
             f"{'KL ε-random':>20} {'KL zero':>9} {'ratio':>6} {'CE clean':>8} {'CE tc':>8} {'CE score':>8}"]
    for layer, m in result["layers"].items():
        lines.append(f"{layer:>5} {m['d_sae']:>6} {_num(m['sparsity']['l0'], '.1f'):>7} "
                     f"{m['sparsity']['dead_latents']:>6} {_num(m['reconstruction']['fvu'], '.3f'):>7} "
                     f"{_pm(m['kl']['transcoder']):>20} {_pm(m['kl']['epsilon_random']):>20} "
                     f"{_num(m['kl']['zero_ablation']['mean'], '.3f'):>9} {_num(m['kl_ratio']['mean'], '.2f'):>6} "
                     f"{_num(m['ce_loss']['clean']['mean'], '.3f'):>8} "
                     f"{_num(m['ce_loss']['transcoder']['mean'], '.3f'):>8} {_num(m['ce_loss_score'], '.3f'):>8}")
    rep = result.get("replacement")
    if rep:
        lines.append(f"full replacement of {len(rep['layers'])} layer(s)"
                     f"{'' if rep['complete'] else ' (not every layer: the rest keep their MLP)'}: "
                     f"CE clean {_pm(rep['ce_loss']['clean'])}")
        for name in REPLACEMENT_VARIANTS:
            lines.append(f"  {name:<15} KL {_pm(rep['kl'][name]):>22}   CE {_pm(rep['ce_loss'][name]):>22}")
        lines.append(f"  KL ratio transcoder / ε-random {_num(rep['kl_ratio']['mean'], '.3f')} ± "
                     f"{_num(rep['kl_ratio']['sem'], '.2g')}, CE score {_num(rep['ce_loss_score'], '.3f')}")
    return "\n".join(lines)


def report_markdown(result: Mapping[str, Any]) -> str:
    """report.md: the summary table and what each variant is."""
    return ("# Transcoder evaluation\n\n```\n" + format_summary(result) + "\n```\n\n"
            "- **transcoder**: the transcoder's output in place of the MLP's (`hook_mlp_out`). A cross-layer "
            "transcoder's output at layer l sums the decoders of the features of every layer ≤ l: alone, those "
            "features are read from the real model's MLP inputs; in the full replacement, from the replaced "
            "stream's.\n"
            "- **epsilon_random**: the MLP's true output plus a random vector of the transcoder's error norm, per "
            "token: the floor a transcoder of that error size would reach if its error were isotropic.\n"
            "- **zero_ablation**: the MLP output set to 0.\n"
            "- **with_errors** (full replacement): every transcoder plus its clean-run error term; equals the model.\n"
            "- ratio = KL transcoder / KL ε-random; CE score = (CE zero − CE tc) / (CE zero − CE clean).\n")
