"""`interplab lens`: the logit lens (and a tuned lens) of every layer, scored on held-out text beside a control.

    kind logit   decode every layer's residual stream through the model's final norm and unembedding
    kind tuned   also train (or load) one affine translator per layer and report both lenses side by side

Writes the run folder (`interplab.runs`): OUT/config.json, OUT/metrics.json (per-layer held-out KL(final ‖ lens)
with its SEM and top-1 agreement, the context-free baselines, the top-k grid for one prompt), OUT/figures/*.png and,
when a lens is trained, OUT/tuned_lens/. A complete run is reported as done; an interrupted one, resumed, reuses
OUT/tuned_lens when it was trained with the same settings instead of training again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
from jaxtyping import Int

from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.lens.configs import LensConfig
from interplab.lens.evaluate import evaluate_lenses, prediction_grid, token_text
from interplab.lens.figures import kl_curves, prediction_grid_figure
from interplab.lens.tuned import TrainSettings, TunedLens, train_from_batches
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model
from interplab.runs import JSONDict, Run

KIND = "lens"
"""The command, as recorded in config.json and metrics.json."""
MAX_PROMPT_TOKENS = 32


def train_settings(cfg: LensConfig) -> TrainSettings:
    """The tuned-lens training settings of `cfg`."""
    return TrainSettings(epochs=cfg.epochs, batch_tokens=cfg.train_batch_tokens, lr=cfg.lr, dtype=cfg.train_dtype,
                         seed=cfg.seed)


def token_batches(cfg: LensConfig, tokenizer: Any, split: str, n_tokens: int
                  ) -> list[Int[torch.Tensor, "batch pos"]]:
    """Enough [batch_size, ctx_len] contexts of `split` for n_tokens scored tokens (ctx_len − 1 per context)."""
    n_contexts = -(-n_tokens // (cfg.ctx_len - 1))
    contexts = list(itertools.islice(iter_contexts(cfg.corpus, tokenizer, cfg.ctx_len, split=split, seed=cfg.seed),
                                     n_contexts))
    if len(contexts) < n_contexts:
        raise InterplabError(f"corpus {cfg.corpus!r} ({split} split) gives only {len(contexts)} contexts of "
                             f"{cfg.ctx_len} tokens; {n_tokens} tokens need {n_contexts}")
    return [torch.stack(contexts[i:i + cfg.batch_size]) for i in range(0, n_contexts, cfg.batch_size)]


def prompt_tokens(tokenizer: Any, prompt: str) -> tuple[list[int], int]:
    """The prompt's ids with BOS in front when the tokenizer has one (as in training), and the first shown column."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos] + ids
    if len(ids) > MAX_PROMPT_TOKENS:
        raise InterplabError(f"--prompt has {len(ids)} tokens; the grid takes at most {MAX_PROMPT_TOKENS}")
    return ids, int(bos is not None)


def run_lens(cfg: LensConfig, *, model: HookedModel | None = None, progress: bool = True) -> JSONDict:
    """Score the lenses on held-out tokens, draw the figures, write OUT/metrics.json; return the metrics. A complete
    run with the same config in OUT is reported as done, not recomputed."""
    cfg.validate()
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not recompute
            return run.metrics
        model = model or load_model(cfg.model, device=cfg.device)
        if model.tokenizer is None:
            raise InterplabError(f"{model.info.spec} has no tokenizer; the lens reads a text corpus and a prompt")
        result = measure(cfg, model, run, progress)
        result["figures"]["kl_curves"] = kl_curves(result, run.figure("lens_kl"))
        for kind in ("logit_lens", "tuned_lens"):
            if kind in result["prompt"]:
                result["figures"][f"grid_{kind}"] = prediction_grid_figure(result["prompt"], kind,
                                                                           run.figure(f"grid_{kind}"))
        run.write_metrics(result)
        return {"kind": KIND, **result}


def measure(cfg: LensConfig, model: HookedModel, run: Run, progress: bool) -> dict[str, Any]:
    """The lenses' held-out scores and the prompt's prediction grids (the tuned lens trained, reused or loaded)."""
    start = time.perf_counter()
    result: dict[str, Any] = {"config": asdict(cfg), "model": model.info.to_dict(), "figures": {}, "seconds": {}}
    lens, tuned_info = None, {}
    if cfg.kind == "tuned":
        lens, tuned_info = obtain_tuned_lens(cfg, model, run.path("tuned_lens"), progress)
        result["seconds"]["tuned_lens"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate_lenses(model, token_batches(cfg, model.tokenizer, "test", cfg.eval_tokens), lens)
    result["seconds"]["evaluate"] = time.perf_counter() - start
    result.update(scores.to_json())
    if lens is not None:
        lens.meta["heldout"] = {"corpus": cfg.corpus, "n_tokens": scores.n_tokens, "kl": scores.tuned["kl"],
                                "logit_lens_kl": scores.logit["kl"]}
        if not tuned_info.get("loaded_from"):
            lens.save(run.path("tuned_lens"))
        result["tuned_lens"] = {**tuned_info, **scores.tuned}
    ids, first = prompt_tokens(model.tokenizer, cfg.prompt)
    decode = token_text(model)
    result["prompt"] = {"text": cfg.prompt, "tokens": [decode(i) for i in ids], "first_shown": first,
                        "logit_lens": prediction_grid(model, ids, None, cfg.top_k)}
    if lens is not None:
        result["prompt"]["tuned_lens"] = prediction_grid(model, ids, lens, cfg.top_k)
    return result


def obtain_tuned_lens(cfg: LensConfig, model: HookedModel, folder: str, progress: bool
                      ) -> tuple[TunedLens, dict[str, Any]]:
    """The tuned lens of this run: loaded from --lens-path, reused from `folder` (OUT/tuned_lens) when it was
    trained with the same settings, or trained now (and saved to `folder`)."""
    if cfg.lens_path:
        lens = TunedLens.load(cfg.lens_path, model)
        return lens, {"loaded_from": cfg.lens_path, "trained_layers": lens.trained_layers, "train": lens.meta}
    wanted = _training_record(cfg, model)
    try:
        previous = TunedLens.load(folder, model)
    except InterplabError:
        previous = None
    if previous is not None and previous.meta.get("record") == wanted:
        return previous, {"reused": folder, "trained_layers": previous.trained_layers,
                          "losses": previous.meta.get("losses", [])}
    start = time.perf_counter()
    batches = token_batches(cfg, model.tokenizer, "train", cfg.train_tokens)
    lens, losses = train_from_batches(model, batches, train_settings(cfg), layers=cfg.layers or None,
                                      progress=progress)
    lens.meta.update({"record": wanted, "losses": losses})
    lens.save(folder)  # now, so an interrupted evaluation does not lose the training
    return lens, {"trained_layers": lens.trained_layers, "train_tokens": lens.meta["train_tokens"],
                  "steps": len(losses), "losses": losses, "train_s": time.perf_counter() - start}


def _training_record(cfg: LensConfig, model: HookedModel) -> dict[str, Any]:
    """What decides a trained lens: if all of it matches, a saved lens can stand in for training again."""
    return {"model": model.info.spec, "corpus": cfg.corpus, "train_tokens": cfg.train_tokens, "ctx_len": cfg.ctx_len,
            "layers": sorted(cfg.layers), "settings": asdict(train_settings(cfg))}


def format_summary(result: Mapping[str, Any]) -> str:
    """Per-layer table: held-out KL of each lens (nats), top-1 agreement, top token at the prompt's last position."""
    logit, tuned = result["logit_lens"], result.get("tuned_lens")
    tuned = tuned if tuned and "kl" in tuned else None
    prompt = result["prompt"]
    base = result["baseline"]
    lines = [f"{result['model']['spec']}: lenses scored on {result['n_tokens']} held-out tokens of "
             f"{result['config']['corpus']}; KL(final ‖ lens) in nats",
             f"controls: mean final distribution {base['mean_distribution_kl']:.3f}, uniform {base['uniform_kl']:.3f}"
             f" (final entropy {base['final_entropy']:.3f})",
             f"{'layer':>5} {'logit KL':>9} {'top1':>5} " + (f"{'tuned KL':>9} {'top1':>5} " if tuned else "")
             + f" top token after {prompt['tokens'][-1]!r} (logit" + (" / tuned)" if tuned else ")")]
    for layer, kl in enumerate(logit["kl"]):
        row = f"{layer:>5} {kl:>9.3f} {logit['top1_agreement'][layer]:>5.2f} "
        if tuned:
            row += f"{tuned['kl'][layer]:>9.3f} {tuned['top1_agreement'][layer]:>5.2f} "
        cells = [prompt[k][layer][-1][0]["token"] for k in ("logit_lens", "tuned_lens") if k in prompt]
        lines.append(row + " " + " / ".join(repr(c) for c in cells))
    lines += [f"figure: {p}" for p in result["figures"].values()]
    return "\n".join(lines)
