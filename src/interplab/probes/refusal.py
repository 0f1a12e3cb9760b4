"""`interplab refusal`: find, select and test a refusal direction (Arditi et al. 2024, "Refusal in language models
is mediated by a single direction"), beside a random direction of the same norm.

1. Candidates r_{l,p}: difference of mean resid_pre between harmful and harmless TRAIN prompts, for every layer l
   (or a stride/subset) and post-instruction template position p (see `refusal_select`).
2. Selection on VAL prompts with batched forward passes (no generation): refusal score under ablation of r̂ (harmful),
   under addition of r at layer l (harmless), KL(original ‖ ablated) on harmless; filters and fallbacks in
   `select_candidate`.
3. Evaluation on TEST prompts: greedy generations, refusal rate by substring matching (`REFUSAL_SUBSTRINGS`), refusal
   score means, for harmful baseline / ablated / random-ablated and harmless baseline / addition / random-addition;
   CE on a text corpus under ablation; the orthogonalised weights against the hook ablation.

Outputs in `out` (a run folder, `interplab.runs`): config.json, metrics.json, direction.safetensors, report.md,
figures/refusal_by_layer.png, orthogonalized-model/.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import save
from tqdm.auto import tqdm

import interplab.probes.refusal_select as S
from interplab.data.corpus import iter_contexts
from interplab.data.files import jsonl_objects
from interplab.errors import InterplabError
from interplab.evals.controls import random_unit_vectors
from interplab.fileio import write_url_atomic
from interplab.models.hooked import HookedModel
from interplab.models.hooks import HookFn
from interplab.models.load import load_model
from interplab.plotting import new_figure, save_figure
from interplab.probes.configs import RefusalConfig
from interplab.probes.orthogonalize import save_orthogonalized
from interplab.probes.refusal_select import REFUSAL_SUBSTRINGS, is_refusal
from interplab.probes.steer import ablation_hooks, addition_hooks
from interplab.runs import JSONDict, Run

__all__ = ["KIND", "PROMPT_FIELDS", "REFUSAL_SUBSTRINGS", "format_summary", "is_refusal", "load_prompts",
           "run_refusal"]

KIND = "refusal"
"""The command, as recorded in config.json and metrics.json."""
PROMPT_DIR = Path(__file__).parent / "prompts"
PROMPT_FIELDS = ("instruction", "category", "split")
SPLITS = ("train", "val", "test")
FIGURE = "refusal_by_layer"
"""The figure: OUT/figures/refusal_by_layer.png."""


def load_prompts(path: str | Path | None, kind: str) -> list[dict[str, str]]:
    """The records of a prompt JSONL (default: the packaged `kind`.jsonl), each with PROMPT_FIELDS checked."""
    path = Path(path) if path else PROMPT_DIR / f"{kind}.jsonl"
    if not path.is_file():
        raise InterplabError(f"{kind} prompt file {path} does not exist")
    records = []
    for where, rec in jsonl_objects(path.read_text(encoding="utf-8"), path):
        missing = [f for f in PROMPT_FIELDS if f not in rec]
        if missing:
            raise InterplabError(f"{where} lacks field(s) {', '.join(missing)}; fields present: "
                                 f"{', '.join(rec) or 'none'}; required: {', '.join(PROMPT_FIELDS)}")
        if rec["split"] not in SPLITS:
            raise InterplabError(f"{where}: split {rec['split']!r} is not one of {', '.join(SPLITS)}")
        if not isinstance(rec["instruction"], str) or not rec["instruction"].strip():
            raise InterplabError(f"{where}: instruction must be a non-empty string")
        records.append({f: str(rec[f]) for f in PROMPT_FIELDS})
    for split in SPLITS:
        if not any(r["split"] == split for r in records):
            raise InterplabError(f"{path} has no {split} prompts; each of {', '.join(SPLITS)} needs at least one")
    return records


def _pick(records: list[dict[str, str]], split: str, n: int) -> list[str]:
    """The `split` instructions; with n > 0, n of them evenly spaced through the file (so that every category of a
    category-ordered file is represented)."""
    chosen = [r["instruction"] for r in records if r["split"] == split]
    if n <= 0 or n >= len(chosen):
        return chosen
    return [chosen[i * len(chosen) // n] for i in range(n)]


def _check(cfg: RefusalConfig, model: HookedModel) -> list[int]:
    """The candidate layers, once the model says how many it has (`cfg.validate()` checked the rest)."""
    if model.tokenizer is None:
        raise InterplabError(f"{cfg.model} has no tokenizer; the refusal pipeline formats chat prompts")
    n_layers = model.info.n_layers
    layers = list(cfg.layers) if cfg.layers else list(range(0, n_layers, cfg.layer_stride))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise InterplabError(f"--layers {bad} out of range: {cfg.model} has layers 0..{n_layers - 1}")
    return sorted(set(layers))


def run_refusal(cfg: RefusalConfig, *, model: HookedModel | None = None, progress: bool = True) -> JSONDict:
    """Run the whole pipeline; write OUT/metrics.json, direction.safetensors, report.md and the figure; return the
    metrics. `model` may be passed already loaded (cfg.model then only labels). A complete run with the same config
    in OUT is reported as done, not recomputed."""
    cfg.validate()
    prompts = {kind: load_prompts(path, kind) for kind, path in (("harmful", cfg.harmful), ("harmless", cfg.harmless))}
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not recompute
            return run.metrics
        t0 = time.time()
        result, r, rand = measure(cfg, model or load_model(cfg.model, device=cfg.device), prompts, progress)
        chosen = result["chosen"]
        meta = {"model": cfg.model, "layer": str(chosen["layer"]), "position": str(chosen["position"]),
                "hook": chosen["hook"], "norm": f"{chosen['norm']:.6g}",
                "method": "difference of means (Arditi 2024)", "random_control_seed": str(cfg.seed)}
        blob = save({"direction": r.detach().float().cpu().contiguous(),
                     "random_control": rand.detach().float().cpu().contiguous()}, metadata=meta)
        write_url_atomic(run.path("direction.safetensors"), blob)
        result["figure"] = write_figure(result, run.figure(FIGURE))
        result["seconds"] = time.time() - t0
        write_report(run.path("report.md"), result)
        run.write_metrics(result)
        return {"kind": KIND, **result}


def measure(cfg: RefusalConfig, model: HookedModel, prompts: Mapping[str, list[dict[str, str]]], progress: bool
            ) -> tuple[dict[str, Any], Float[torch.Tensor, " d_model"], Float[torch.Tensor, " d_model"]]:
    """Candidates, selection and test (steps 1-3 of the module docstring) on the loaded prompt records; returns the
    result, the chosen direction r and the random control direction of the same norm."""
    layers = _check(cfg, model)
    tok, n_layers = model.tokenizer, model.info.n_layers
    fmt = S.chat_format(tok)
    if fmt.source != "tokenizer":
        tqdm.write(f"note: {cfg.model}'s tokenizer has no chat template; using SmolLM2's ChatML format")
    n_post, pad_id = len(fmt.post_ids), S.pad_id_of(tok)
    refusal_ids = S.refusal_token_ids(tok, cfg.refusal_words)
    text = {(kind, split): _pick(recs, split, {"train": 0, "val": cfg.val_size, "test": cfg.test_size}[split])
            for kind, recs in prompts.items() for split in SPLITS}
    ids = {key: S.tokenize_prompts(tok, fmt, v) for key, v in text.items()}
    longest = max(len(p) for v in ids.values() for p in v) + cfg.max_new_tokens
    if longest > model.info.n_ctx:
        raise InterplabError(f"the longest prompt plus --max-new-tokens is {longest} tokens, more than "
                             f"{cfg.model}'s context of {model.info.n_ctx}")
    bs = cfg.batch_size

    # 1. candidates; 2. selection on val
    directions = S.candidate_directions(model, ids["harmful", "train"], ids["harmless", "train"], layers, n_post,
                                        pad_id, bs)
    val_base = {kind: S.refusal_score(S.last_logits(model, ids[kind, "val"], pad_id, batch_size=bs)[0], refusal_ids)
                for kind in ("harmful", "harmless")}
    rows = S.score_candidates(model, directions, layers, ids["harmful", "val"], ids["harmless", "val"], refusal_ids,
                              pad_id, bs, progress)
    best, selection_note = S.select_candidate(rows, n_layers, cfg.kl_limit, cfg.max_layer_fraction)
    layer, position = best["layer"], best["position"]
    r = directions[layers.index(layer), position + n_post].to(model.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    rand = random_unit_vectors(r.shape, gen).to(r) * r.norm()   # the control: same norm, random direction

    # 3. test: generations and first-token scores per condition
    alpha = float(r.norm())
    conditions = {
        "harmful_baseline": ("harmful", []), "harmful_ablated": ("harmful", ablation_hooks(model, r)),
        "harmful_random_ablated": ("harmful", ablation_hooks(model, rand)),
        "harmless_baseline": ("harmless", []),
        "harmless_addition": ("harmless", addition_hooks(model, r, layer, alpha)),
        "harmless_random_addition": ("harmless", addition_hooks(model, rand, layer, alpha)),
    }
    test: dict[str, Any] = {}
    test_logits: dict[str, torch.Tensor] = {}
    for name, (kind, hooks) in conditions.items():
        prompts = ids[kind, "test"]
        test_logits[name] = S.last_logits(model, prompts, pad_id, hooks=hooks, batch_size=bs)[0]
        texts = S.generate(model, prompts, pad_id, hooks, cfg.max_new_tokens, bs, name, progress)
        test[name] = S.condition_metrics(texts, test_logits[name], refusal_ids, text[kind, "test"], cfg.n_examples)
    test["kl_harmless_ablated"] = float(S.kl_last(test_logits["harmless_baseline"], S.last_logits(
        model, ids["harmless", "test"], pad_id, hooks=ablation_hooks(model, r), batch_size=bs)[0]).mean())

    ce = _ce_metrics(cfg, model, ablation_hooks(model, r), ablation_hooks(model, rand)) if cfg.ce_tokens else None
    orth = _orthogonalized(cfg, model, r, ids, pad_id, refusal_ids) if cfg.orthogonalize else None

    result = {
        "config": asdict(cfg), "model_info": model.info.to_dict(),
        "chat_format": {"source": fmt.source, "prefix": fmt.prefix, "post_instruction": fmt.suffix,
                        "post_instruction_tokens": [tok.decode([t]) for t in fmt.post_ids]},
        "refusal_tokens": {w: tok.decode([t]) for w, t in zip(cfg.refusal_words, S.refusal_token_ids(
            tok, cfg.refusal_words))} | {"ids": refusal_ids},
        "refusal_substrings": list(REFUSAL_SUBSTRINGS),
        "n_prompts": {f"{kind}_{split}": len(v) for (kind, split), v in text.items()},
        "layers": layers,
        "val_baseline": {k: float(v.mean()) for k, v in val_base.items()},
        "candidates": rows,
        "chosen": {"layer": layer, "position": position,
                   "position_token": tok.decode([fmt.post_ids[position]]), "norm": alpha,
                   "hook": f"blocks.{layer}.hook_resid_pre", "selection": selection_note, "scores": best},
        "test": test, "ce": ce, "orthogonalized": orth,
    }
    return result, r, rand


def _ce_metrics(cfg: RefusalConfig, model: HookedModel, abl_hooks: list[tuple[str, HookFn]],
                rand_hooks: list[tuple[str, HookFn]]) -> dict[str, float | int | str]:
    """Corpus CE loss without hooks, with the direction ablated, and with the random direction ablated."""
    n = max(1, cfg.ce_tokens // cfg.ce_ctx_len)
    contexts = list(itertools.islice(iter_contexts(cfg.corpus, model.tokenizer, cfg.ce_ctx_len, split="test",
                                                   seed=cfg.seed), n))
    if not contexts:
        raise InterplabError(f"corpus '{cfg.corpus}' yields no context of {cfg.ce_ctx_len} tokens")
    base = S.corpus_ce(model, contexts, [])
    abl, rnd = S.corpus_ce(model, contexts, abl_hooks), S.corpus_ce(model, contexts, rand_hooks)
    return {"n_tokens": len(contexts) * cfg.ce_ctx_len, "corpus": cfg.corpus, "baseline": base, "ablated": abl,
            "random_ablated": rnd, "delta_ablated": abl - base, "delta_random_ablated": rnd - base}


def _orthogonalized(cfg: RefusalConfig, model: HookedModel, r: Float[torch.Tensor, " d_model"],
                    ids: Mapping[tuple[str, str], list[list[int]]], pad_id: int, refusal_ids: list[int]
                    ) -> dict[str, Any]:
    """Weights with r̂ projected out of every matrix writing to the residual stream, against the hook ablation: the
    two should give the same logits up to float error. The hooked reference is computed before the weights are
    written, in case the writer edits the loaded model."""
    prompts = ids["harmful", "test"] + ids["harmless", "test"]
    hooked = S.last_logits(model, prompts, pad_id, hooks=ablation_hooks(model, r), batch_size=cfg.batch_size)[0]
    folder = str(Path(cfg.out) / "orthogonalized-model")
    save_orthogonalized(model, r.detach().cpu(), folder, overwrite=True)
    orth_model = load_model(folder, device=cfg.device)
    orth = S.last_logits(orth_model, prompts, pad_id, batch_size=cfg.batch_size)[0]
    n_harm = len(ids["harmful", "test"])
    del orth_model
    return {"folder": folder, "n_prompts": len(prompts), "max_abs_logit_diff": float((orth - hooked).abs().max()),
            "logit_scale": float(hooked.abs().max()),
            "harmful_refusal_score_mean": float(S.refusal_score(orth[:n_harm], refusal_ids).mean())}


# ---- report ----------------------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = ".3g") -> str:
    return "–" if v is None else format(v, fmt)


def format_summary(result: Mapping[str, Any]) -> str:
    """A few lines for the terminal: baseline refusal rates, the chosen direction, and its effect beside the random
    control."""
    t, c = result["test"], result["chosen"]
    rate = {k: f"{v['refusal_rate']:.0%} (score {v['refusal_score_mean']:+.2f})" for k, v in t.items()
            if isinstance(v, dict)}
    lines = [f"refusal direction for {result['config']['model']}: layer {c['layer']}, position {c['position']} "
             f"({c['position_token']!r}), ‖r‖ = {c['norm']:.3g}; {c['selection']}",
             f"harmful test:  baseline {rate['harmful_baseline']}, ablated {rate['harmful_ablated']}, "
             f"random-ablated {rate['harmful_random_ablated']}",
             f"harmless test: baseline {rate['harmless_baseline']}, addition {rate['harmless_addition']}, "
             f"random-addition {rate['harmless_random_addition']}",
             f"KL(original ‖ ablated) on harmless test, last position: {t['kl_harmless_ablated']:.3g} nats"]
    if result.get("ce"):
        ce = result["ce"]
        lines.append(f"CE on {ce['corpus']} ({ce['n_tokens']} tokens): {ce['baseline']:.4f} → ablated "
                     f"{ce['ablated']:.4f} ({ce['delta_ablated']:+.4f}), random {ce['delta_random_ablated']:+.4f}")
    if result.get("orthogonalized"):
        o = result["orthogonalized"]
        lines.append(f"orthogonalised weights vs hook ablation: max |Δlogit| = {o['max_abs_logit_diff']:.3g} "
                     f"(logits up to {o['logit_scale']:.3g})")
    lines.append(f"written to {result['config']['out']} in {result['seconds']:.0f} s")
    return "\n".join(lines)


def write_figure(result: Mapping[str, Any], path: str) -> str:
    """Refusal score under ablation (harmful val) and addition (harmless val) per layer, at the chosen position."""
    c = result["chosen"]
    rows = sorted((r for r in result["candidates"] if r["position"] == c["position"] and r["kl"] is not None),
                  key=lambda r: r["layer"])
    fig, ax = new_figure(7, 4)
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["ablation_score"] for r in rows], "o-", color="tab:blue", label="harmful val, r̂ ablated")
    ax.plot(layers, [r["addition_score"] for r in rows], "s-", color="tab:red", label="harmless val, r added")
    ax.axhline(result["val_baseline"]["harmful"], color="tab:blue", ls="--", lw=1, label="harmful val, baseline")
    ax.axhline(result["val_baseline"]["harmless"], color="tab:red", ls="--", lw=1, label="harmless val, baseline")
    ax.axvline(c["layer"], color="grey", ls=":", lw=1)
    cut = result["config"]["max_layer_fraction"] * result["model_info"]["n_layers"]
    ax.axvspan(cut, max(layers + [cut]) + 0.5, color="grey", alpha=0.15, label="excluded (late layers)")
    ax.set_xlabel("layer of the direction (resid_pre)")
    ax.set_ylabel("refusal score: log-odds of a refusal token")
    ax.set_title(f"position {c['position']} ({c['position_token']!r}); chosen layer {c['layer']}", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_report(path: str, result: Mapping[str, Any]) -> str:
    """report.md: the refusal rates per condition, the chosen direction and its selection, definitions, the
    candidates at the chosen position, the figure and example generations."""
    t, c, cfg = result["test"], result["chosen"], result["config"]
    hb, lb = t["harmful_baseline"]["refusal_rate"], t["harmless_baseline"]["refusal_rate"]
    lines = ["# Refusal direction", "",
             f"**Baseline refusal rate on held-out harmful prompts: {hb:.0%}** "
             f"({t['harmful_baseline']['n']} prompts; harmless: {lb:.0%}). Model `{cfg['model']}`, greedy "
             f"generations of {cfg['max_new_tokens']} tokens, refusal = any of the substrings listed below.", ""]
    if hb < 0.3:
        lines += [f"The model refuses few harmful requests to begin with ({hb:.0%}), so there is little refusal for "
                  "an ablation to remove; the direction is better judged by what adding it does to harmless prompts, "
                  "by the first-token refusal scores, and against the random direction.", ""]
    lines += [f"Chosen direction: layer {c['layer']} (`{c['hook']}`), post-instruction position {c['position']} "
              f"(token {c['position_token']!r}), ‖r‖ = {c['norm']:.3g}. Selection: {c['selection']}. Filters: val KL < "
              f"{cfg['kl_limit']}, layer < {cfg['max_layer_fraction']:.0%} of depth, addition score > 0; this "
              f"candidate: val KL {c['scores']['kl']:.3g}, ablation score {c['scores']['ablation_score']:+.3f}, "
              f"addition score {c['scores']['addition_score']:+.3f}.", "", "## Test prompts", "",
              "| condition | refusal rate | mean refusal score | n |", "| --- | --- | --- | --- |"]
    for name, v in t.items():
        if isinstance(v, dict):
            lines.append(f"| {name} | {v['refusal_rate']:.0%} | {v['refusal_score_mean']:+.3f} | {v['n']} |")
    lines += ["", f"Random control: a seeded Gaussian direction of the same norm, ablated and added at the same layer "
              f"with the same α. KL(original ‖ ablated) on harmless test prompts at the last position: "
              f"{t['kl_harmless_ablated']:.3g} nats.", ""]
    if result.get("ce"):
        ce = result["ce"]
        lines += [f"CE loss on `{ce['corpus']}` ({ce['n_tokens']} tokens): baseline {ce['baseline']:.4f}, ablated "
                  f"{ce['ablated']:.4f} ({ce['delta_ablated']:+.4f}), random-direction ablation "
                  f"{ce['random_ablated']:.4f} ({ce['delta_random_ablated']:+.4f}).", ""]
    if result.get("orthogonalized"):
        o = result["orthogonalized"]
        lines += [f"Orthogonalised weights (`{o['folder']}`) against the hook ablation on {o['n_prompts']} test "
                  f"prompts: max |Δlogit| = {o['max_abs_logit_diff']:.3g} (largest |logit| {o['logit_scale']:.3g}).",
                  ""]
    rt = result["refusal_tokens"]
    lines += ["## Definitions", "",
              "Refusal score = log P(R) − log(1 − P(R)) at the first generated token, R = first tokens of "
              + ", ".join(f"{w!r}" for w in rt if w != "ids") + f" (ids {rt['ids']}).",
              "Refusal substrings (case-insensitive): " + ", ".join(f"`{s}`" for s in result["refusal_substrings"]),
              f"Chat format: {result['chat_format']['source']}; post-instruction tokens "
              f"{result['chat_format']['post_instruction_tokens']}. Prompts: {result['n_prompts']}.", "",
              "## Candidates at the chosen position", "",
              "| layer | ablation score (harmful val) | addition score (harmless val) | KL | passes |",
              "| --- | --- | --- | --- | --- |"]
    for r in sorted(result["candidates"], key=lambda r: r["layer"]):
        if r["position"] == c["position"]:
            lines.append(f"| {r['layer']} | {_f(r['ablation_score'], '+.3f')} | {_f(r['addition_score'], '+.3f')} | "
                         f"{_f(r['kl'])} | {'yes' if r['passes'] else 'no'} |")
    lines += ["", f"Val baselines: harmful {result['val_baseline']['harmful']:+.3f}, harmless "
              f"{result['val_baseline']['harmless']:+.3f}. All candidates are in metrics.json.", "",
              f"![refusal score per layer](figures/{FIGURE}.png)", "", "## Example generations", ""]
    for name, v in t.items():
        if isinstance(v, dict):
            lines += [f"### {name}", ""]
            lines += [f"- *{e['instruction']}* → {e['generation'].strip()!r}" for e in v["examples"]]
            lines.append("")
    write_url_atomic(path, ("\n".join(lines) + "\n").encode())
    return path
