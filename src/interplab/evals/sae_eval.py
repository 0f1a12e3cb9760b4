"""`interplab sae eval`: an SAE's reconstruction, sparsity and downstream metrics, each beside its controls.

Per batch of contexts the model runs ONCE up to the SAE's hook (`run_prefix`); every variant of the activation x
there is then spliced in with `run_suffix`, so all variants share that prefix:

    clean            x                       (run through the suffix too: the reference logits)
    sae              x̂ = sae(x)
    zero_ablation    0
    mean_ablation    μ = mean of x over the non-BOS tokens of the FIRST batch (a fixed estimate, so that every batch
                     is ablated with the same vector and no second pass over the corpus is needed)
    epsilon_random   x + ‖x − x̂‖·u, u a fresh random unit vector per token (seeded)
    sae_norm_patch   x·‖x̂‖/‖x‖;   sae_output_at_original_norm  x̂·‖x‖/‖x̂‖
    covariance_matched  x + e, e ~ N(0, Σ_err) rescaled to ‖x − x̂‖; Σ_err from the SAE errors of the FIRST batch

BOS (position 0) is left out everywhere: it is never replaced (every variant keeps the clean activation there) and
no per-token statistic counts it (its norm is an outlier that would dominate MSE, variance and the ablations).
`reconstruction_typical`: the same reconstruction metrics over the tokens with ‖x‖ ≤ MASSIVE_NORM_FACTOR × the
median norm, with the count of the others (a few massive activations can dominate MSE and FVU).
KL(clean ‖ variant) is per position 1..T−1; CE is the next-token loss predicted from positions 1..T−2.
Key names follow SAELens's `evals.py` (ce_loss_score, kl_div_score, explained_variance, l0, ...), and SAELens's
groups are there too (reconstruction_quality, shrinkage, model_performance_preservation, model_behavior_preservation,
sparsity, token_stats; `eval_summary.saelens_groups`), without `explained_variance_legacy` (batch-size dependent).
The result carries "kind": "sae eval"; --out is checked before any work (evals/outputs.py: new, or this evaluation's
own earlier result, which is recomputed and replaced).

`metrics.per_token` (see `token_analysis`): the per-token KL gap (sae − epsilon_random) against log10 token frequency,
each KL position labelled with its INPUT token id tokens[:, t] (the token whose activation was replaced and from which
the next token is predicted), binned with mean ± SEM per bin, and its Pearson correlation with log10 frequency.
With `figures` set, kl_histograms.png and kl_gap_vs_frequency.png are written there and listed under `figures`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.evals import controls as C
from interplab.evals.configs import EvalConfig
from interplab.evals.eval_summary import Moments, format_summary, scale_tuning_summary, summarise
from interplab.evals.figures import kl_gap_vs_frequency, kl_histograms
from interplab.evals.metrics import clean_log_probs, firing_counts, kl_and_ce_per_token
from interplab.evals.scale_tune import ScaleTuneResult, decode_scaled, tune_decoder_scale
from interplab.evals.token_analysis import per_token_analysis
from interplab.evals.outputs import check_figures_folder, check_result_file, write_result
from interplab.fileio import join
from interplab.models.hooked import HookedModel
from interplab.sae.base import SparseAutoencoder
from interplab.sae.loading import load_sae_and_model
from interplab.runs import finite_json

__all__ = ["KIND", "PER_TOKEN_VARIANTS", "TUNED_VARIANTS", "VARIANTS", "check_outputs", "evaluate", "format_summary"]

KIND = "sae eval"
"""The "kind" of the result JSON (as in a run folder's metrics.json)."""
FIGURES = ("kl_histograms.png", "kl_gap_vs_frequency.png")

VARIANTS = ("sae", "zero_ablation", "mean_ablation", "epsilon_random", "sae_norm_patch",
            "sae_output_at_original_norm", "covariance_matched")
"""The spliced variants, besides `clean`, in the order they are run."""
TUNED_VARIANTS = ("sae_scale_tuned", "epsilon_random_scale_tuned")
"""Added with --scale-tune: the SAE with its learned decoder scales, and ε-random at that SAE's error norm."""
MASSIVE_NORM_FACTOR = 10.0
"""Tokens with ‖x‖ above this multiple of the median norm (of the first batch) are 'massive activations' (attention
sinks beyond BOS, e.g. 0.03% of SmolLM2 layer-15 tokens at ~100x the median norm). They can hold most of the variance,
so `reconstruction_typical` repeats the reconstruction metrics without them."""
PER_TOKEN_VARIANTS = ("sae", "epsilon_random", "sae_norm_patch")
"""The variants whose per-token KL the per-token analysis and the KL histograms use."""


def _check_model(cfg: EvalConfig, model: HookedModel) -> None:
    """The checks that need the model (hook and width are checked by `load_sae_and_model`)."""
    if cfg.ctx_len > model.info.n_ctx:
        raise InterplabError(f"--ctx-len {cfg.ctx_len} is longer than {model.info.spec} allows ({model.info.n_ctx})")
    if model.tokenizer is None:
        raise InterplabError(f"{model.info.spec} has no tokenizer, so it cannot read a text corpus")


def _is_legacy_result(saved: dict[str, Any]) -> bool:
    """A result of `sae eval` written before results carried "kind"."""
    return isinstance(saved.get("metrics"), dict) and "sae_config" in saved


def check_outputs(cfg: EvalConfig) -> None:
    """Refuse --out and --figures unless this evaluation may write there (evals/outputs.py), before any work; with
    model and hook not given, they are compared once resolved (`evaluate` calls this again then)."""
    check_result_file(cfg.out, KIND, asdict(cfg), is_legacy=_is_legacy_result, resolved_later=("model", "hook"))
    check_figures_folder(cfg.figures, FIGURES)


def _tune(cfg: EvalConfig, sae: SparseAutoencoder, model: HookedModel, progress: bool) -> ScaleTuneResult:
    """Fit the decoder scales on train-split contexts (held out from a test-split evaluation)."""
    contexts = list(itertools.islice(iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split="train",
                                                   seed=cfg.seed + 1, test_fraction=cfg.test_fraction),
                                     cfg.scale_tune_tokens // cfg.ctx_len))
    return tune_decoder_scale(model, sae, cfg.hook, contexts, per=cfg.scale_tune, epochs=cfg.scale_tune_epochs,
                              lr=cfg.scale_tune_lr, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)


@torch.no_grad()
def evaluate(cfg: EvalConfig, *, sae: SparseAutoencoder | None = None, model: HookedModel | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the evaluation; return {"config", "sae_config", "n_tokens", "n_contexts", "metrics"} (also written to
    cfg.out as JSON if set). `sae` and `model` may be passed already loaded (then cfg.sae / cfg.model only label)."""
    cfg.validate()
    check_outputs(cfg)
    loaded = load_sae_and_model(cfg.sae, cfg.model, cfg.hook, cfg.device, loaded_sae=sae, loaded_model=model)
    model = loaded.model
    _check_model(cfg, model)
    cfg = replace(cfg, model=loaded.model_spec, hook=loaded.hook)
    check_outputs(cfg)  # again with the model and hook the SAE recorded, still before the first forward pass
    sae = loaded.sae.float()
    hook = loaded.hook
    tuned = _tune(cfg, sae, model, progress) if cfg.scale_tune != "none" else None
    variants = VARIANTS + (TUNED_VARIANTS if tuned is not None else ())

    n_contexts = cfg.tokens // cfg.ctx_len
    contexts = itertools.islice(iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split=cfg.split,
                                              seed=cfg.seed, test_fraction=cfg.test_fraction), n_contexts)
    gen_eps = torch.Generator(device=model.device).manual_seed(cfg.seed)
    gen_cov = torch.Generator(device=model.device).manual_seed(cfg.seed + 1)
    gen_eps_tuned = torch.Generator(device=model.device).manual_seed(cfg.seed + 2)
    mean: Tensor | None = None
    cov_factor: Tensor | None = None
    kl: dict[str, list[Tensor]] = {v: [] for v in variants}
    ce: dict[str, list[Tensor]] = {v: [] for v in ("clean", *variants)}
    token_ids: list[Tensor] = []  # the input token at each KL position (BOS excluded), for the per-token analysis
    moments, tuned_moments, typical, counts = Moments(), Moments(), Moments(), None
    norm_cut = math.inf
    l0_sum = l1_sum = 0.0
    done = 0
    batch = list(itertools.islice(contexts, cfg.batch_size))  # read before the bar, so a bad corpus fails cleanly
    if not batch:
        raise InterplabError(f"corpus '{cfg.corpus}' ({cfg.split} split) yields no context of {cfg.ctx_len} tokens")
    bar = tqdm(total=n_contexts * cfg.ctx_len, unit="tok", unit_scale=True, desc="sae eval", disable=not progress)
    while batch:
        tokens = torch.stack(batch).to(model.device)                                 # [B T]
        prefix = model.run_prefix(tokens, hook)
        act = prefix.act
        x = act[:, 1:].float()                                                       # [B T-1 d], BOS left out
        f = sae.encode(x)
        x_hat = sae.decode(f)
        flat_x, flat_err = x.reshape(-1, x.shape[-1]), (x - x_hat).reshape(-1, x.shape[-1])
        if mean is None:
            mean = flat_x.mean(0)
            cov_factor = C.error_covariance_factor(flat_err) if flat_err.shape[0] >= 2 else None
            norm_cut = MASSIVE_NORM_FACTOR * flat_x.norm(dim=-1).median().item()
        replacements: dict[str, Callable[[], Tensor]] = {
            "sae": lambda: x_hat,
            "zero_ablation": lambda: C.zero_ablation(x),
            "mean_ablation": lambda: C.mean_ablation(x, mean),
            "epsilon_random": lambda: C.epsilon_random(x, x_hat, gen_eps),
            "sae_norm_patch": lambda: C.sae_norm_patch(x, x_hat),
            "sae_output_at_original_norm": lambda: C.sae_output_at_original_norm(x, x_hat),
            "covariance_matched": lambda: (C.covariance_matched_error(x, x_hat, cov_factor, gen_cov)
                                           if cov_factor is not None else x),
        }
        if tuned is not None:
            x_tuned = decode_scaled(sae, f, tuned.scale, tuned.per)
            tuned_moments.add(flat_x, x_tuned.reshape(flat_x.shape))
            replacements["sae_scale_tuned"] = lambda: x_tuned
            replacements["epsilon_random_scale_tuned"] = lambda: C.epsilon_random(x, x_tuned, gen_eps_tuned)
        clean = model.run_suffix(prefix, act)
        token_ids.append(tokens[:, 1:].flatten().to(torch.int32).cpu())
        clean_lp = clean_log_probs(clean)  # shared by every variant's KL
        clean_ce = -clean_lp.logp[:, :-1].gather(-1, tokens[:, 1:, None].long()).squeeze(-1)  # no 2nd softmax
        ce["clean"].append(clean_ce[:, 1:].flatten().double().cpu())
        for name in variants:
            spliced = torch.cat([act[:, :1], replacements[name]().to(act.dtype)], dim=1)  # BOS kept clean
            logits = model.run_suffix(prefix, spliced)
            kl_tok, ce_tok = kl_and_ce_per_token(clean_lp, logits, tokens)
            kl[name].append(kl_tok[:, 1:].flatten().double().cpu())
            ce[name].append(ce_tok[:, 1:].flatten().double().cpu())
        moments.add(flat_x, x_hat.reshape(flat_x.shape))
        is_typical = flat_x.norm(dim=-1) <= norm_cut
        if is_typical.any():
            typical.add(flat_x[is_typical], x_hat.reshape(flat_x.shape)[is_typical])
        fired = firing_counts(f)
        counts = fired if counts is None else counts.merge(fired)
        l0_sum += (f != 0).sum().item()
        l1_sum += f.double().abs().sum().item()
        done += len(batch)
        bar.update(len(batch) * cfg.ctx_len)
        batch = list(itertools.islice(contexts, cfg.batch_size))
    bar.close()
    if done < n_contexts:
        tqdm.write(f"note: the corpus ran out after {done} of {n_contexts} contexts")

    kl_t = {k: torch.cat(v) for k, v in kl.items()}                                # per variant: [n_tokens]
    metrics = summarise(kl_t, {k: torch.cat(v) for k, v in ce.items()}, moments, counts, f, l0_sum, l1_sum)
    if tuned is not None:
        metrics["scale_tuning"] = scale_tuning_summary(tuned, kl_t, tuned_moments, held_out=cfg.split == "test")
    metrics["reconstruction_typical"] = {**(typical.metrics() if typical.n else {}), "norm_cut": norm_cut,
                                         "n_massive": moments.n - typical.n,
                                         "massive_fraction": 1 - typical.n / moments.n}
    per_token_kl = {k: kl_t[k].float().numpy() for k in PER_TOKEN_VARIANTS}  # 1-D float32, n_tokens
    metrics["per_token"] = per_token_analysis(per_token_kl, torch.cat(token_ids).numpy())
    result = {"kind": KIND, "config": asdict(cfg), "sae_config": sae.cfg.to_dict(), "n_contexts": done,
              "n_tokens": moments.n, "n_tokens_total": done * cfg.ctx_len, "bos_excluded": True, "metrics": metrics}
    if cfg.figures:
        result["figures"] = _write_figures(cfg.figures, per_token_kl, metrics["per_token"])
    result = finite_json(result)
    if cfg.out:
        write_result(cfg.out, result)
    return result


def _write_figures(folder: str, per_token_kl: Mapping[str, np.ndarray],
                   per_token: dict[str, Any]) -> dict[str, str]:
    """Draw kl_histograms.png and kl_gap_vs_frequency.png into `folder`; return {figure name: path}."""
    return {
        "kl_histograms": kl_histograms(per_token_kl, join(folder, "kl_histograms.png")),
        "kl_gap_vs_frequency": kl_gap_vs_frequency(per_token["bins"], join(folder, "kl_gap_vs_frequency.png"),
                                                   corr=per_token["corr_gap_log10_freq"]),
    }
