"""`interplab toy inspect RUN`: circuit read-outs of a toy transformer trained by `interplab toy train`.

Read-off positions are the positions where the task's loss mask is True (the head tasks and modular addition mask
only the last position, the read-off). Each read-off is grouped by its target token — for ov-coherent that is the
pair C({A, B}), for skip-trigram C(b) or "none" — and every per-group number below is over those groups.

    attention   per head, the attention the read-off pays to each token id, summed over the positions holding it
                and averaged over the group's examples (each row sums to 1), and the mean pattern by key position
    EQKE        per head, the attention logit (q · k / √d_head, biases included) of a query token at the read-off
                position against a key token; keys take the *mean* position embedding (a token can sit at any
                position). `readoff`: the tokens seen at the read-off × input tokens; `full`: input × input (the
                query still at the read-off position: in a 1-layer model only the read-off's queries count).
    EVOU        per head, the logits a key token adds to each output token through the head,
                (x̂ W_V + b_V) W_O[h] C W_U', keys again at the mean position embedding. x̂ is the stream normalised
                like the model (`normalize`; identity without LayerNorm), W_U' the unembedding with the final norm's scale
                folded in, C the centring of a final LayerNorm (identity without). The final norm's division by the
                whole stream's norm is left out: with LayerNorm EVOU is the logit direction up to a positive factor.
                metrics.json keeps EVOU raw; the figure and the per-head summary centre each row over the outputs
                (b_V adds a shift shared by every output, which changes no answer).
    preference  ov-coherent: per head, the signal tokens ranked by the pairs {A ≠ B} in which the read-off attends
                more to them; a head attending to the first member of each pair under one fixed order has a total
                order (the trained 2-head model splits pairs between two heads with reversed orders).
    ablation    accuracy per group with one head removed. Zero-ablation sets the head's attention pattern to 0 at
                `blocks.0.attn.hook_pattern`, so z_h = 0 and the head writes nothing (b_O, shared by all heads, stays);
                mean-ablation replaces the head's output z_h W_O[h] by its mean over the batch at each position.
    Fourier     modular addition only, any architecture: power per frequency k = 0..p//2 of the embedding of the
                number tokens, P(k) = Σ_d |Σ_t W_E[t, d] e^{−2πi k t / p}|² (one-sided; t = 0..p−1), for the final
                model and every checkpoint; sparsity = share of the non-constant power (k ≥ 1) in the top
                FOURIER_TOP frequencies. "before" is the last checkpoint before the test-accuracy jump (`jump_step`),
                "after" the final model.

EQKE, EVOU and the ablations need a 1-layer attention-only model (with more layers or an MLP the head's direct path
is not the whole computation), and `run_toy_inspect` draws the attention with them; the Fourier view reads any
modular-addition run.

Writes the run folder (`interplab.runs`, default RUN/inspect): OUT/config.json, OUT/metrics.json (every read-out
above), OUT/report.md and OUT/figures/. A rerun with the same config into OUT reports the saved read-outs; another
config is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic
from interplab.models.load import default_device
from interplab.models.toy import ToyTransformer
from interplab.runs import JSONDict, Run
from interplab.toy.configs import InspectToyConfig
from interplab.toy.figures import circuit_figures, fourier_bars, report_markdown
from interplab.toy.fourier import fourier_view
from interplab.toy.tasks import Task, TaskBatch
from interplab.toy.toy_run import load_run
from interplab.weights.extract import attention_weights, embedding, normalize, positional_embedding, unembedding
from interplab.weights.factored import FactoredMatrix

Tensor = torch.Tensor
KIND = "toy inspect"
"""The command, as recorded in config.json and metrics.json."""
TIE = 0.1
"""Attention masses closer than this count as a tie in `pair_preference`."""
BROKEN = 0.5
"""A group fails when its accuracy is below this; an ablation breaks it if it fails only under the ablation."""


class Readouts(NamedTuple):
    """The masked positions of a batch, flattened: read-off n is tokens[example[n], position[n]]."""

    example: Int[Tensor, " n"]
    position: Int[Tensor, " n"]
    target: Int[Tensor, " n"]
    group: Int[Tensor, " n"]
    """Index into `groups` of the target."""
    groups: list[int]
    """The target token ids, in the task's output-token order (targets outside it follow, sorted)."""


def require_one_layer_attention_only(model: ToyTransformer, what: str) -> None:
    """Raise unless `model` is a 1-layer attention-only toy transformer (what a direct-path read-out needs)."""
    if not isinstance(model, ToyTransformer):
        raise InterplabError(f"{what} reads the in-house toy transformer; got {type(model).__name__}")
    cfg = model.cfg
    if cfg.n_layers != 1 or cfg.d_mlp is not None:
        raise InterplabError(f"{what} needs a 1-layer attention-only model (n_layers 1, d_mlp None); {model.info.spec} "
                             f"has {cfg.n_layers} layer(s) and d_mlp={cfg.d_mlp}, so one head's direct path is not "
                             "the whole computation")


def readouts(task: Task, batch: TaskBatch) -> Readouts:
    """The masked positions of `batch` and the group (target token) of each."""
    example, position = torch.nonzero(batch.mask.cpu(), as_tuple=True)
    if example.numel() == 0:
        raise InterplabError(f"task {task.spec()} produced a batch whose loss mask is False everywhere")
    target = batch.targets.cpu()[example, position]
    outputs = list(task.output_tokens())
    groups = outputs + sorted(set(target.tolist()) - set(outputs))
    lookup = torch.full((max(groups) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(groups)] = torch.arange(len(groups))
    return Readouts(example, position, target, lookup[target], groups)


# ---- attention from the read-off ------------------------------------------------------------------------------
@torch.no_grad()
def pattern(model: ToyTransformer, tokens: Int[Tensor, "batch pos"], layer: int = 0) -> Float[Tensor, "batch head q k"]:
    """The attention pattern of block `layer`."""
    name = f"blocks.{layer}.attn.hook_pattern"
    return model.run_with_cache(tokens.to(model.device), [name]).cache[name]


def attention_by_group(
    pat: Float[Tensor, "batch head q k"], tokens: Int[Tensor, "batch pos"], ro: Readouts, d_vocab: int
) -> Float[Tensor, "head group d_vocab"]:
    """A[h, g, t] = mean over group g's read-offs of Σ_{k: tokens[k] = t} pattern[h, read-off, k]: where the read-off
    looks, by token id. Rows sum to 1 (causal keys only); a group without read-offs is NaN."""
    rows = pat[ro.example.to(pat.device), :, ro.position.to(pat.device)].float()  # [n head k]
    keys = torch.nn.functional.one_hot(tokens.to(pat.device)[ro.example.to(pat.device)], d_vocab).float()  # [n k V]
    onehot_group = torch.nn.functional.one_hot(ro.group, len(ro.groups)).float().to(pat.device)  # [n g]
    total = torch.einsum("ng,nhk,nkt->hgt", onehot_group, rows, keys)
    return (total / onehot_group.sum(0)[None, :, None]).cpu()


def pair_preference(by_group: Float[Tensor, "head group d_vocab"], groups: list[int],
                    pairs: dict[int, tuple[int, int]]) -> list[dict[str, Any]]:
    """ov-coherent: per head, the signal tokens ranked by their wins — pairs {A ≠ B} whose read-off attends more to
    that token than to the other. A head that always attends to the preferred member of a pair by one fixed order
    has wins n−1, n−2, ..., 0 (`total_order`). Masses within TIE of each other split the win. `pairs`: output token
    → (A, B)."""
    signals = sorted({t for pair in pairs.values() for t in pair})
    out = []
    for head in by_group:
        wins = dict.fromkeys(signals, 0.0)
        for g, token in enumerate(groups):
            a, b = pairs.get(token, (0, 0))
            if a == b or torch.isnan(head[g, a]):
                continue
            diff = float(head[g, a] - head[g, b])
            for t, share in ((a, 0.5), (b, 0.5)) if abs(diff) < TIE else ((a if diff > 0 else b, 1.0),):
                wins[t] += share
        order = sorted(signals, key=lambda t: -wins[t])
        out.append({"order": order, "wins": [wins[t] for t in order],
                    "total_order": sorted(wins.values()) == list(range(len(signals)))})
    return out


# ---- EQKE and EVOU ----------------------------------------------------------------------------------------------
def _stream(model: ToyTransformer, token_ids: list[int], pos: Float[Tensor, " d_model"]) -> Float[Tensor, "n d_model"]:
    """x̂ for each token at a position embedding `pos`: what the folded weights read."""
    return normalize(model, embedding(model)[token_ids] + pos)


def positions(model: ToyTransformer, n_ctx: int) -> tuple[Float[Tensor, " d_model"], Float[Tensor, " d_model"]]:
    """(read-off position embedding W_pos[n_ctx − 1], mean position embedding over 0..n_ctx − 1)."""
    W_pos = positional_embedding(model)[:n_ctx]
    return W_pos[-1], W_pos.mean(0)


def eqke(model: ToyTransformer, query_tokens: list[int], key_tokens: list[int], n_ctx: int
         ) -> Float[Tensor, "head query key"]:
    """Attention logits (q_h · k_h / √d_head) of each query token at the read-off position against each key token at
    the mean position; q_h = x̂ W_Q'[h] + b_Q'[h], k_h = x̂ W_K'[h] + b_K'[h] (norm folded)."""
    require_one_layer_attention_only(model, "EQKE")
    attn = attention_weights(model, 0)
    readoff_pos, mean_pos = positions(model, n_ctx)
    q = _stream(model, query_tokens, readoff_pos) @ attn.W_Q + attn.b_Q[:, None]  # [head query d_head]
    k = _stream(model, key_tokens, mean_pos) @ attn.W_K + attn.b_K[:, None]  # [head key d_head]
    return FactoredMatrix(q, k.transpose(-1, -2)).AB / math.sqrt(attn.W_Q.shape[-1])


def evou(model: ToyTransformer, input_tokens: list[int], output_tokens: list[int], n_ctx: int
         ) -> Float[Tensor, "head input output"]:
    """Logits each input token (as a key at the mean position) adds to each output token through head h:
    (x̂ W_V'[h] + b_V[h]) W_O[h] C W_U' (C: centring of a final LayerNorm)."""
    require_one_layer_attention_only(model, "EVOU")
    attn = attention_weights(model, 0)
    W_U, _ = unembedding(model)
    W_O = attn.W_O
    if isinstance(model.ln_final, torch.nn.LayerNorm):  # LayerNorm reads only the centred part of what heads write
        W_O = W_O - W_O.mean(-1, keepdim=True)
    v = _stream(model, input_tokens, positions(model, n_ctx)[1]) @ attn.W_V + attn.b_V[:, None]  # [head in d_head]
    return FactoredMatrix(v, W_O @ W_U[:, output_tokens]).AB


# ---- head ablation ----------------------------------------------------------------------------------------------
def group_accuracy(logits: Float[Tensor, "batch pos vocab"], ro: Readouts) -> tuple[float, list[float | None]]:
    """(accuracy over all read-offs, accuracy per group; None for a group without read-offs)."""
    correct = (logits.argmax(-1).cpu()[ro.example, ro.position] == ro.target).float()
    hits = torch.zeros(len(ro.groups)).index_add_(0, ro.group, correct)
    counts = torch.zeros(len(ro.groups)).index_add_(0, ro.group, torch.ones_like(correct))
    per = [None if c == 0 else float(h / c) for h, c in zip(hits, counts)]
    return float(correct.mean()), per


@torch.no_grad()
def head_outputs(model: ToyTransformer, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos head d_model"]:
    """z_h W_O[h]: what each head of block 0 writes (without b_O), recomputed from the pattern and block input."""
    attn = model.blocks[0].attn
    cache = model.run_with_cache(tokens, ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"]).cache
    x = model.blocks[0].ln1(cache["blocks.0.hook_resid_pre"])
    v = torch.einsum("bpd,hde->bhpe", x, attn.W_V) + attn.b_V[:, None]
    z = cache["blocks.0.attn.hook_pattern"] @ v  # [batch head pos d_head]
    return torch.einsum("bhpe,hed->bphd", z, attn.W_O)


@torch.no_grad()
def ablate_heads(model: ToyTransformer, tokens: Int[Tensor, "batch pos"], method: str
                 ) -> list[Float[Tensor, "batch pos vocab"]]:
    """Logits with each head of block 0 removed in turn (`method` "zero" or "mean", see the module docstring)."""
    require_one_layer_attention_only(model, "head ablation")
    tokens = tokens.to(model.device)
    if method == "zero":
        def hook(h: int):
            def zero(pat: Tensor, _name: str) -> Tensor:
                pat = pat.clone()
                pat[:, h] = 0
                return pat
            return "blocks.0.attn.hook_pattern", zero
    elif method == "mean":
        outs = head_outputs(model, tokens)  # [batch pos head d_model]

        def hook(h: int):
            def mean(out: Tensor, _name: str) -> Tensor:
                return out - outs[:, :, h] + outs[:, :, h].mean(0)
            return "blocks.0.hook_attn_out", mean
    else:
        raise InterplabError(f"ablation method {method!r} is not valid; choose from zero, mean")
    return [model.run_with_hooks(tokens, [hook(h)]) for h in range(model.cfg.n_heads)]


# ---- the command ------------------------------------------------------------------------------------------------
def run_toy_inspect(cfg: InspectToyConfig) -> JSONDict:
    """Every read-out the run's model allows; writes OUT/metrics.json, OUT/report.md, OUT/figures/*.png and returns
    the metrics. A complete run with the same config in OUT is reported as done, not recomputed."""
    cfg.validate()
    toy = load_run(cfg.run, cfg.device or default_device())  # a missing or foreign --run fails before OUT is touched
    task, model = toy.task, toy.model
    circuits = model.cfg.n_layers == 1 and model.cfg.d_mlp is None
    modular = task.name == "modular-addition"
    if not circuits and not modular:  # only the Fourier view reads a model of any shape
        require_one_layer_attention_only(model, "toy inspect (attention, EQKE, EVOU, head ablation)")
    with Run.open(cfg.out, KIND, asdict(cfg)) as run:
        if run.metrics is not None:  # a complete run of this config: report it, do not recompute
            return run.metrics
        batch = task.sample(cfg.examples, torch.Generator().manual_seed(cfg.seed))
        ro, names = readouts(task, batch), task.token_names()
        with torch.no_grad():
            full = _accuracy_row(model(batch.tokens.to(model.device)), ro, names)
        result: dict[str, Any] = {
            "config": asdict(cfg), "task": task.spec(), "model": asdict(model.cfg), "token_names": names,
            "input_tokens": task.input_tokens(), "output_tokens": task.output_tokens(),
            "groups": [names[g] for g in ro.groups],
            "group_counts": torch.bincount(ro.group, minlength=len(ro.groups)).tolist(),
            "accuracy": {"sample": full["accuracy"], **_split_accuracy(task, model)}, "figures": {},
            "circuits": None if circuits else f"skipped: {model.cfg.n_layers} layer(s), d_mlp={model.cfg.d_mlp} "
                                              "(needs 1 layer, attention-only)",
        }
        if circuits:
            result.update(_circuit_readouts(model, task, batch, ro, full))
            result["figures"].update(circuit_figures(result, run.figure))
        if modular:
            result["fourier"] = fourier_view(toy, task.p)
            result["figures"]["fourier"] = fourier_bars(result["fourier"], run.figure("fourier"))
        write_url_atomic(run.path("report.md"), report_markdown(result, run.out).encode())
        run.write_metrics(result)
        return {"kind": KIND, **result}


def _circuit_readouts(model: ToyTransformer, task: Task, batch: TaskBatch, ro: Readouts, full: dict[str, Any]
                      ) -> dict[str, Any]:
    """Attention, EQKE, EVOU and both ablations of a 1-layer attention-only model, as JSON-ready lists."""
    names = task.token_names()
    tokens = batch.tokens.to(model.device)
    pat = pattern(model, tokens)
    by_group = attention_by_group(pat, tokens, ro, model.cfg.d_vocab)
    counts = torch.bincount(ro.group, minlength=len(ro.groups)).float()
    overall = torch.nansum(by_group * counts[None, :, None], 1) / counts.sum()  # [head V]
    inputs, outputs = task.input_tokens(), task.output_tokens()
    queries = sorted(set(batch.tokens[ro.example, ro.position].tolist()))
    eq_readoff, eq_full = eqke(model, queries, inputs, task.n_ctx), eqke(model, inputs, inputs, task.n_ctx)
    ev = evou(model, inputs, outputs, task.n_ctx)
    ev_centred = ev - ev.mean(-1, keepdim=True)  # a shift shared by all outputs does not change which one wins
    ablation = {"full": full}
    for method in ("zero", "mean"):
        ablation[method] = [_accuracy_row(logits, ro, names, full) for logits in ablate_heads(model, tokens, method)]
    prefs = pair_preference(by_group, ro.groups, dict(zip(outputs, task.pairs()))) if hasattr(task, "pairs") else None
    heads = []
    for h in range(model.cfg.n_heads):
        top_att = overall[h].topk(min(3, overall.shape[1]))
        flat = ev_centred[h].flatten().topk(min(3, ev[h].numel()))
        heads.append({
            "head": h,
            "attends_to": [[names[t], round(float(v), 4)] for v, t in zip(top_att.values, top_att.indices)],
            "evou_top": [[names[inputs[i // len(outputs)]], names[outputs[i % len(outputs)]], round(float(v), 4)]
                         for v, i in zip(flat.values, flat.indices)],
            "evou_argmax": {names[t]: names[outputs[int(j)]] for t, j in zip(inputs, ev[h].argmax(-1))},
            "evou_norm": float(ev_centred[h].norm()),
            "zero_ablated_accuracy": ablation["zero"][h]["accuracy"],
            "mean_ablated_accuracy": ablation["mean"][h]["accuracy"],
        })
        if prefs:  # names, e.g. S2 > S3 > S4 > S1
            heads[-1]["pair_preference"] = {**prefs[h], "order": [names[t] for t in prefs[h]["order"]]}
    return {"heads": heads, "ablation": ablation, "attention": {
                "by_group": by_group.tolist(), "overall": overall.tolist(),
                "by_position": pat[:, :, task.n_ctx - 1].mean(0).cpu().tolist()},
            "eqke": {"queries": [names[t] for t in queries], "keys": [names[t] for t in inputs],
                     "readoff": eq_readoff.cpu().tolist(), "full": eq_full.cpu().tolist()},
            "evou": {"inputs": [names[t] for t in inputs], "outputs": [names[t] for t in outputs],
                     "matrix": ev.cpu().tolist()}}


def _accuracy_row(logits: Float[Tensor, "batch pos vocab"], ro: Readouts, names: list[str],
                  full: dict[str, Any] | None = None) -> dict[str, Any]:
    """Accuracy, per group, the groups failing (accuracy < BROKEN) and, under an ablation, the groups `broken`: those
    failing that the full model gets right."""
    acc, per = group_accuracy(logits, ro)
    failing = [names[g] for g, a in zip(ro.groups, per) if a is not None and a < BROKEN]
    before = set(full["failing"] if full else failing)
    return {"accuracy": acc, "per_group": per, "failing": failing, "broken": [g for g in failing if g not in before]}


@torch.no_grad()
def _split_accuracy(task: Task, model: ToyTransformer) -> dict[str, float]:
    """Accuracy on every pair of the train and test splits, for tasks that have them (modular addition)."""
    out = {}
    for split in ("train", "test"):
        if callable(getattr(task, f"{split}_batch", None)):
            batch = getattr(task, f"{split}_batch")()
            logits = model(batch.tokens.to(model.device)).cpu()
            out[split] = float((logits.argmax(-1) == batch.targets)[batch.mask].float().mean())
    return out


def format_summary(result: JSONDict) -> str:
    """A few lines: task, accuracy, what each head attends to, ablation damage, Fourier sparsity."""
    acc = result["accuracy"]
    lines = [f"task {result['task']}: accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())]
    if result.get("circuits"):
        lines.append(f"circuit read-outs {result['circuits']}")
    n_groups = len(result["groups"])
    if "ablation" in result:
        lines.append(f"full model: {len(result['ablation']['full']['failing'])}/{n_groups} target groups failing "
                     f"(accuracy < {BROKEN})")
    for head, zero, mean in zip(result.get("heads", []), *(result.get("ablation", {}).get(m, []) for m in
                                                            ("zero", "mean"))):
        pref = head.get("pair_preference")
        if pref:
            lines.append(f"head {head['head']}: in each pair attends to the first of "
                         + (" > ".join(pref["order"]) if pref["total_order"] else "(no fixed order; wins "
                            + ", ".join(f"{t} {w:g}" for t, w in zip(pref["order"], pref["wins"])) + ")"))
        lines.append(f"head {head['head']}: attends to " + ", ".join(f"{t} {v:.2f}" for t, v in head["attends_to"])
                     + f"; zero-ablated acc {zero['accuracy']:.3f} ({len(zero['broken'])}/{n_groups} groups "
                     f"broken), mean-ablated {mean['accuracy']:.3f} ({len(mean['broken'])}/{n_groups})")
    if "fourier" in result:
        f = result["fourier"]
        for label in ("before", "after"):
            if f[label]:
                lines.append(f"Fourier {label} (step {f[label]['step']}): top-{f['top']} share "
                             f"{f[label]['top_fraction']:.3f}, frequencies {f[label]['top_frequencies']}")
    return "\n".join(lines)
