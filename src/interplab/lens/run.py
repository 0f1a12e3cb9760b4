"""`interplab lens`: the logit lens (and a tuned lens) of every layer, scored on held-out text beside a control.

    kind logit   decode every layer's residual stream through the model's final norm and unembedding
    kind tuned   also train (or load) one affine translator per layer and report both lenses side by side

Writes OUT/lens.json (per-layer held-out KL(final ‖ lens) with its SEM and top-1 agreement, the context-free
baselines, the top-k grid for one prompt), OUT/figures/*.png and, when a lens is trained, OUT/tuned_lens/.
A re-run with the same OUT and the same training settings reuses OUT/tuned_lens instead of training again.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from interplab.errors import InterplabError, check_int

KINDS = ("logit", "tuned")
MAX_PROMPT_TOKENS = 32


@dataclass
class LensConfig:
    """Logit lens and tuned lens of every layer, scored on held-out tokens."""

    model: str = "smollm2-135m"
    """Model spec (see `interplab harvest --help`)."""
    kind: str = "tuned"
    """logit: the logit lens only; tuned: train (or load) a tuned lens and report both."""
    corpus: str = "python-docs"
    """Corpus of the training tokens (train split) and the held-out tokens (test split)."""
    train_tokens: int = 16384
    """Tokens the tuned lens is trained on (position 0 of each context, BOS, is not counted or used)."""
    eval_tokens: int = 2048
    """Held-out tokens both lenses are scored on."""
    ctx_len: int = 128
    """Tokens per context."""
    batch_size: int = 8
    """Contexts per forward pass of the model."""
    epochs: int = 1
    """Passes of tuned-lens training over its cached residuals."""
    train_batch_tokens: int = 32
    """Tokens per tuned-lens optimiser step."""
    lr: float = 3e-3
    """Peak AdamW learning rate of the tuned lens (10% warm-up, cosine decay)."""
    train_dtype: str = "bfloat16"
    """Compute dtype of the readout during tuned-lens training (float32 or bfloat16); scoring is always float32."""
    layers: list[int] = field(default_factory=list)
    """Layers whose translator is trained (default: all but the last, whose logit lens is already exact)."""
    lens_path: str | None = None
    """Folder of a saved tuned lens to use instead of training one."""
    prompt: str = "The capital of France is Paris, and the capital of Germany is"
    """Prompt of the token × layer grid of top predictions."""
    top_k: int = 5
    """Predictions kept per cell of the grid in lens.json."""
    out: str = "lens"
    """Output folder: lens.json, figures/, tuned_lens/."""
    seed: int = 0
    """Seed of the corpus order and the training order."""
    device: str | None = None
    """Device to run the model on (default: cuda if available, else cpu)."""

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise InterplabError(f"--kind {self.kind!r} is not valid; choose from {', '.join(KINDS)}")
        for name, minimum in (("train_tokens", 1), ("eval_tokens", 1), ("ctx_len", 2), ("batch_size", 1),
                              ("epochs", 1), ("train_batch_tokens", 1), ("top_k", 1)):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum)
        if not self.lr > 0:
            raise InterplabError(f"--lr must be > 0, got {self.lr}")
        if self.train_dtype not in ("float32", "bfloat16"):
            raise InterplabError(f"--train-dtype {self.train_dtype!r} is not valid; choose float32 or bfloat16")
        if not self.prompt.strip():
            raise InterplabError("--prompt is empty; give a text for the grid of top predictions")
        if self.lens_path and self.kind != "tuned":
            raise InterplabError("--lens-path needs --kind tuned")

    def settings(self) -> Any:
        from interplab.lens.tuned import TrainSettings

        return TrainSettings(epochs=self.epochs, batch_tokens=self.train_batch_tokens, lr=self.lr,
                             dtype=self.train_dtype, seed=self.seed)


def token_batches(cfg: LensConfig, tokenizer: Any, split: str, n_tokens: int) -> list[Any]:
    """Enough [batch_size, ctx_len] contexts of `split` for n_tokens scored tokens (ctx_len − 1 per context)."""
    import torch

    from interplab.data import iter_contexts

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


def run_lens(cfg: LensConfig, *, model: Any = None, progress: bool = True) -> dict[str, Any]:
    """Score the lenses on held-out tokens, draw the figures, write OUT/lens.json; return what it holds."""
    from interplab.fileio import write_url_atomic
    from interplab.models import load_model
    from interplab.lens.figures import kl_curves, prediction_grid_figure
    from interplab.lens.evaluate import evaluate_lenses, prediction_grid, token_text

    cfg.validate()
    model = model or load_model(cfg.model, device=cfg.device)
    if model.tokenizer is None:
        raise InterplabError(f"{model.info.spec} has no tokenizer; the lens reads a text corpus and a prompt")
    root = cfg.out.rstrip("/")
    start = time.perf_counter()
    result: dict[str, Any] = {"config": asdict(cfg), "model": model.info.to_dict(), "figures": {}, "seconds": {}}
    lens, tuned_info = None, {}
    if cfg.kind == "tuned":
        lens, tuned_info = obtain_tuned_lens(cfg, model, root, progress)
        result["seconds"]["tuned_lens"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate_lenses(model, token_batches(cfg, model.tokenizer, "test", cfg.eval_tokens), lens)
    result["seconds"]["evaluate"] = time.perf_counter() - start
    result.update(scores.to_json())
    if lens is not None:
        lens.meta["heldout"] = {"corpus": cfg.corpus, "n_tokens": scores.n_tokens, "kl": scores.tuned["kl"],
                                "logit_lens_kl": scores.logit["kl"]}
        if not tuned_info.get("loaded_from"):
            lens.save(f"{root}/tuned_lens")
        result["tuned_lens"] = {**tuned_info, **scores.tuned}
    ids, first = prompt_tokens(model.tokenizer, cfg.prompt)
    decode = token_text(model)
    result["prompt"] = {"text": cfg.prompt, "tokens": [decode(i) for i in ids], "first_shown": first,
                        "logit_lens": prediction_grid(model, ids, None, cfg.top_k)}
    if lens is not None:
        result["prompt"]["tuned_lens"] = prediction_grid(model, ids, lens, cfg.top_k)
    result["figures"]["kl_curves"] = kl_curves(result, f"{root}/figures/lens_kl.png")
    for kind in ("logit_lens", "tuned_lens"):
        if kind in result["prompt"]:
            result["figures"][f"grid_{kind}"] = prediction_grid_figure(result["prompt"], kind,
                                                                       f"{root}/figures/grid_{kind}.png")
    write_url_atomic(f"{root}/lens.json", (json.dumps(result, indent=2) + "\n").encode())
    return result


def obtain_tuned_lens(cfg: LensConfig, model: Any, root: str, progress: bool) -> tuple[Any, dict[str, Any]]:
    """The tuned lens of this run: loaded from --lens-path, reused from OUT/tuned_lens when it was trained with the
    same settings, or trained now (and saved to OUT/tuned_lens)."""
    from interplab.lens.tuned import TunedLens, train_from_batches

    if cfg.lens_path:
        lens = TunedLens.load(cfg.lens_path, model)
        return lens, {"loaded_from": cfg.lens_path, "trained_layers": lens.trained_layers, "train": lens.meta}
    wanted = _training_record(cfg, model)
    try:
        previous = TunedLens.load(f"{root}/tuned_lens", model)
    except InterplabError:
        previous = None
    if previous is not None and previous.meta.get("record") == wanted:
        return previous, {"reused": f"{root}/tuned_lens", "trained_layers": previous.trained_layers,
                          "losses": previous.meta.get("losses", [])}
    start = time.perf_counter()
    batches = token_batches(cfg, model.tokenizer, "train", cfg.train_tokens)
    lens, losses = train_from_batches(model, batches, cfg.settings(), layers=cfg.layers or None, progress=progress)
    lens.meta.update({"record": wanted, "losses": losses})
    lens.save(f"{root}/tuned_lens")  # now, so an interrupted evaluation does not lose the training
    return lens, {"trained_layers": lens.trained_layers, "train_tokens": lens.meta["train_tokens"],
                  "steps": len(losses), "losses": losses, "train_s": time.perf_counter() - start}


def _training_record(cfg: LensConfig, model: Any) -> dict[str, Any]:
    """What decides a trained lens: if all of it matches, a saved lens can stand in for training again."""
    return {"model": model.info.spec, "corpus": cfg.corpus, "train_tokens": cfg.train_tokens, "ctx_len": cfg.ctx_len,
            "layers": sorted(cfg.layers), "settings": asdict(cfg.settings())}


def format_summary(result: dict[str, Any]) -> str:
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
