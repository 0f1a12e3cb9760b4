"""`interplab beliefs train`: a toy transformer trained on a hidden Markov process, with its loss against the optimum.

Data. Every step draws `batch_size` fresh stationary sequences of ctx + 1 tokens from the process (seeded by the step
index, so a resumed run sees the very batches an uninterrupted one would). As in Shai et al. (2024) the model reads
raw process tokens, with no BOS: input tokens x₁…x_ctx, targets x₂…x_{ctx+1}. So the model at position L (having
read L tokens) predicts x_{L+1}, and its best possible expected loss there is the myopic entropy

    h(L+1) = H(X_{L+1} | X_1 … X_L)      (nats),     L = 1 … ctx,

the expected entropy of the Bayesian predictive distribution P(· | η_L). (h(1), the entropy of a first token with no
context, is never a target.) "Tokens" count input positions: tokens = steps · batch_size · ctx.

Evaluation uses the true predictive distribution rather than the sampled next token: over every sequence w of
length ctx when there are at most `eval_sequences` of them (weighted by P(w)), else over `eval_sequences` sampled ones,

    loss(L) = E_w CE(P(· | η_L(w)), q(· | w_≤L))        gap(L) = E_w KL(P(· | η_L(w)) ‖ q(· | w_≤L)) ≥ 0

with q the model's prediction. Exactly, loss(L) = h(L+1) + gap(L); with sampled w the KL is a far less noisy estimate
of the excess loss than the CE (its spread across w is that of the excess alone, not of the entropy).

Run folder OUT (`interplab.runs.Run`, kind "beliefs train"): config.json ({"kind", "config"}; the config without the
fields a resume may change), checkpoints/step-N/ (`interplab.toy.loop`: N steps = N · batch_size · ctx tokens) at
roughly log-spaced token counts, model/ (the final model), and metrics.json (loss curve, per-position loss vs
optimum at every checkpoint; written last). Training runs through `interplab.toy.loop.train_loop`; re-running with
the same config resumes from the last checkpoint; a different config in the same OUT is an error.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from jaxtyping import Float, Int

from interplab.beliefs.configs import BeliefTrainConfig
from interplab.beliefs.msp import all_sequences, belief_states, myopic_entropy
from interplab.beliefs.process import Process, make_process, next_token_probabilities, sample
from interplab.errors import InterplabError
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.runs import CONFIG, JSONDict, Run, read_json_object
from interplab.toy.loop import StepOutcome, TrainResult, train_loop
from interplab.toy.loop import saved_checkpoints as saved_steps

Tensor = torch.Tensor
KIND = "beliefs train"
"""The run kind in config.json and metrics.json."""
CHECKPOINT_MANTISSAS = (1.0, 2.0, 3.2, 6.4)
"""Default checkpoint grid: these × 10^k tokens. Roughly log-spaced (steps ×1.6 to ×2), and it includes the
64k, 640k and 3.2M tokens at which Shai et al. report their Mess3 regression MSE."""
EVAL_SEED_OFFSET = 1 << 40
"""Sampled evaluation sequences (when the context is too long to enumerate) use seed + this: no training step does."""

EvalSet = tuple[Int[Tensor, "m ctx"], Float[Tensor, " m"], Float[Tensor, "m ctx x"]]
"""(tokens, weights summing to 1, true predictive distributions) of the exact evaluation."""


def checkpoint_tokens(cfg: BeliefTrainConfig) -> list[int]:
    """The token counts checkpointed, each rounded up to whole steps, the last being the run's total."""
    per_step, total = cfg.tokens_per_step, cfg.steps * cfg.tokens_per_step
    wanted = cfg.checkpoints or [int(m * 10 ** k) for k in range(4, 13) for m in CHECKPOINT_MANTISSAS]
    return sorted({min(math.ceil(t / per_step), cfg.steps) * per_step for t in wanted if t > 0} | {total})



def load_config(out: str | Path) -> BeliefTrainConfig:
    """The config of the beliefs train run in OUT (its volatile fields at their defaults, `out` = OUT)."""
    path = Path(out) / CONFIG
    if not path.is_file():
        raise InterplabError(f"{out} holds no beliefs train run (no {CONFIG}; `interplab beliefs train --out RUN` "
                             "writes one)")
    saved = read_json_object(str(path))
    config = saved.get("config")
    if saved.get("kind") != KIND or not isinstance(config, dict):
        raise InterplabError(f"{path} is not a beliefs train run's config (kind {saved.get('kind')!r})")
    names = {f.name for f in fields(BeliefTrainConfig)}
    return BeliefTrainConfig(**{k: v for k, v in config.items() if k in names}, out=str(out))  # type: ignore[arg-type]


def saved_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """(tokens, folder) of every complete checkpoint of the beliefs train run in OUT, in training order."""
    per_step = load_config(out).tokens_per_step
    return [(step * per_step, path) for step, path in saved_steps(out)]


def build_model(cfg: BeliefTrainConfig, n_tokens: int) -> ToyTransformer:
    """The untrained model `cfg` describes, reading `n_tokens` token ids."""
    toy = ToyConfig(n_layers=cfg.layers, d_model=cfg.d_model, n_heads=cfg.heads,
                    d_head=cfg.d_head or cfg.d_model // cfg.heads, d_mlp=cfg.d_mlp or 4 * cfg.d_model,
                    n_ctx=cfg.ctx, d_vocab=n_tokens, seed=cfg.seed)
    return ToyTransformer(toy, spec=f"beliefs:{cfg.process}")


def learning_rate(cfg: BeliefTrainConfig, step: int) -> float:
    """Linear warmup to lr, then a cosine to lr · lr_final at the last step (a function of the step alone, so a
    resumed run follows the same schedule)."""
    warm = max(1, round(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t)))


def evaluation_set(process: Process, cfg: BeliefTrainConfig) -> EvalSet:
    """(tokens [m, ctx], weights [m] summing to 1, true predictive distributions [m, ctx, x]) for the exact loss."""
    if process.n_tokens ** cfg.ctx <= cfg.eval_sequences:
        tokens, probs = all_sequences(process, cfg.ctx)
        keep = probs > 0
        tokens, weights = tokens[keep], probs[keep]
    else:
        tokens = sample(process, cfg.eval_sequences, cfg.ctx, seed=cfg.seed + EVAL_SEED_OFFSET)
        weights = torch.ones(len(tokens), dtype=torch.float64)
    return tokens, weights / weights.sum(), next_token_probabilities(process, belief_states(process, tokens))


@torch.no_grad()
def expected_loss(model: ToyTransformer, eval_set: EvalSet, batch: int = 8192) -> tuple[list[float], list[float]]:
    """(loss, gap) per position L (nats): E_w CE(P(· | η_L), q(· | w_≤L)) and E_w KL(P(· | η_L) ‖ q(· | w_≤L))."""
    tokens, weights, truth = eval_set
    ce = torch.zeros(tokens.shape[1], dtype=torch.float64)
    kl = torch.zeros(tokens.shape[1], dtype=torch.float64)
    for i in range(0, len(tokens), batch):
        logq = torch.log_softmax(model(tokens[i:i + batch].to(model.device)).double().cpu(), -1)
        p, w = truth[i:i + batch], weights[i:i + batch, None]
        ce += (w * -(p * logq).sum(-1)).sum(0)
        kl += (w * (torch.special.xlogy(p, p) - p * logq).sum(-1)).sum(0)
    return ce.tolist(), kl.tolist()


def train_beliefs(cfg: BeliefTrainConfig) -> TrainResult:
    """Train (or resume, or find complete) the run `cfg` describes; see the module docstring. `resumed_from` counts
    steps (of cfg.tokens_per_step tokens)."""
    start = time.perf_counter()
    cfg.validate()
    process = make_process(cfg.process)
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.status != "new" and not cfg.resume:
            raise InterplabError(f"{run.out} already holds a run; pass --resume to continue it, or use a new --out")
        if run.metrics is not None:
            return TrainResult(run.out, run.metrics, cfg.steps, time.perf_counter() - start)
        return _train(cfg, process, run, start)


def _train(cfg: BeliefTrainConfig, process: Process, run: Run, start: float) -> TrainResult:
    """The training of `train_beliefs` into the open run folder `run`."""
    # h(L+1) for L = 1..ctx: the model at position L predicts token L+1.
    optimum = myopic_entropy(process, cfg.ctx + 1, base=math.e)[1:].tolist()
    mean_optimum = sum(optimum) / len(optimum)
    model = build_model(cfg, process.n_tokens).to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    per_step, plan = cfg.tokens_per_step, set(checkpoint_tokens(cfg))
    eval_set = evaluation_set(process, cfg)
    # window: the training losses since the last point of the loss curve (saved, so a resumed curve is the same)
    state: JSONDict = {"loss_curve": [], "checkpoints": [], "window": [], "seconds": 0.0}
    session = {"seconds_before": 0.0}

    def seconds() -> float:
        return session["seconds_before"] + time.perf_counter() - start

    def restore(saved: JSONDict) -> None:
        state.update(saved)
        session["seconds_before"] = float(saved["seconds"])  # type: ignore[arg-type]

    def batch_loss(step: int) -> Tensor:
        batch = sample(process, cfg.batch_size, cfg.ctx + 1, seed=cfg.seed * 1_000_003 + step).to(cfg.device)
        return torch.nn.functional.cross_entropy(model(batch[:, :-1]).transpose(1, 2), batch[:, 1:])

    def after_step(step: int, loss: float) -> StepOutcome:
        window, postfix = state["window"], None
        assert isinstance(window, list) and isinstance(state["loss_curve"], list)
        window.append(loss)
        if len(window) == cfg.log_every or step == cfg.steps:
            mean = sum(window) / len(window)  # type: ignore[arg-type]
            state["loss_curve"].append({"tokens": step * per_step, "loss": mean, "gap": mean - mean_optimum})
            postfix = {"loss": f"{mean:.4f}", "gap": f"{mean - mean_optimum:+.4f}"}
            state["window"] = []
        if step * per_step not in plan:
            return StepOutcome(postfix=postfix)
        loss_l, gap = expected_loss(model.eval(), eval_set)
        model.train()
        assert isinstance(state["checkpoints"], list)
        state["checkpoints"].append({"tokens": step * per_step, "loss": loss_l, "gap": gap,  # type: ignore[dict-item]
                                     "mean_gap": sum(gap) / len(gap), "seconds": seconds()})
        return StepOutcome(checkpoint=True, postfix=postfix)

    def state_now() -> JSONDict:
        return {**state, "seconds": seconds()}

    done = train_loop(model, optimizer, run.out, steps=cfg.steps, learning_rate=lambda s: learning_rate(cfg, s),
                      batch_loss=batch_loss, after_step=after_step, state=state_now, restore=restore,
                      progress=cfg.progress, desc=f"train {process.name}")
    model.save(Path(run.out) / "model")
    checkpoints = state["checkpoints"]
    assert isinstance(checkpoints, list)
    run.write_metrics({
        "tokens": done.steps * per_step, "tokens_per_step": per_step, "optimum": optimum,
        "optimum_note": "h(L+1) in nats at position L = 1..ctx (the model at L predicts token L+1); each "
                        "checkpoint's gap is E KL(true predictive || model) per position",
        "final": checkpoints[-1], "checkpoints": checkpoints, "loss_curve": state["loss_curve"],
        "train_seconds": done.seconds})
    assert run.metrics is not None
    return TrainResult(run.out, run.metrics, done.resumed_from, time.perf_counter() - start)


def format_summary(result: TrainResult) -> str:
    """Per position: loss, optimum and gap at the end; then tokens, time, mean gap and the checkpoints."""
    m = result.metrics
    final, optimum, checkpoints = m["final"], m["optimum"], m["checkpoints"]
    assert isinstance(final, dict) and isinstance(optimum, list) and isinstance(checkpoints, list)
    loss, gap = final["loss"], final["gap"]
    assert isinstance(loss, list) and isinstance(gap, list)
    lines = [f"{'L':>3} {'loss':>8} {'h(L+1)':>8} {'gap (KL)':>9}"]
    lines += [f"{i:>3} {a:8.4f} {b:8.4f} {g:9.5f}" for i, (a, b, g) in enumerate(zip(loss, optimum, gap), start=1)]
    mean_gap = sum(gap) / len(gap)  # type: ignore[arg-type]
    resumed = f", resumed at {result.resumed_from * m['tokens_per_step']:,} tokens" if result.resumed_from else ""
    lines.append(f"trained {m['tokens']:,} tokens into {result.out} in {result.seconds:.0f} s{resumed}; "
                 f"mean gap to the optimum {mean_gap:+.5f} nats; checkpoints at "
                 + ", ".join(f"{c['tokens']:,}" for c in checkpoints))  # type: ignore[index]
    return "\n".join(lines)
