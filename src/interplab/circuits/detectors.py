"""Head detectors: previous-token, duplicate-token, induction, copying and copy-suppression scores for every head,
each beside two controls.

Pattern scores are read from `blocks.{l}.attn.hook_pattern` on repeated random sequences

    tokens = [BOS, r_1 … r_L, r_1 … r_L]      positions 0, 1 … L, L+1 … 2L;   r_i uniform over non-special ids

For a query q in the second copy (q = L+1 … 2L, the token at q first appeared at q − L), with A[q, k] the attention
of q on key k:

    previous-token   A[q, q − 1]
    duplicate-token  A[q, q − L]         (the earlier occurrence of the same token)
    induction        A[q, q − L + 1]     (the token that followed the earlier occurrence)

each averaged over the L queries of a sequence, then mean and SEM over sequences.

Weight scores read the full OV circuit x̂_E W_V W_O W_U of each head (x̂_E: the token embeddings normalised as the
folded W_V reads them; weights from `interplab.weights` with the norms folded in):

    copying = Σ Re λ / Σ |λ|  over its eigenvalues (Elhage et al. 2021; TransformerLens's copying score), with
              W_U centred over the vocabulary (logits are shift-invariant; see `copying_scores`)
    copy-suppression = −copying

The d_vocab × d_vocab circuit is never formed: its nonzero eigenvalues are those of the d_head × d_head product
W_O (W_U x̂_E) W_V (cyclic permutation: eig(AB) \\ {0} = eig(BA) \\ {0}), and W_U x̂_E (d_model × d_model) is formed
once.

Controls beside each score:
- shuffled: for pattern scores, the same statistic read at a random key instead of the detector's key: for each
  (sequence, query) one position drawn uniformly from 1 … q other than the target (BOS is left out, as no detector
  targets it and heads park attention there). It is the attention an arbitrary earlier token gets, i.e. the
  head's chance level at that query. For weight scores, the copying score of the same circuit with its output
  tokens permuted (x̂_E W_V W_O W_U P): the same spectrum statistic with the token-to-itself map broken.
- random weights: every score on a model of the same shape freshly initialised with the seed (HF: the same config
  through `from_config`; toy: the same ToyConfig with another seed), on the same token sequences.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from transformers import AutoModelForCausalLM

from interplab.errors import InterplabError, check_int
from interplab.models.hf import HFHookedModel
from interplab.models.hooked import HookedModel
from interplab.models.toy import ToyTransformer
from interplab.weights.circuits import copying_score
from interplab.weights.extract import attention_weights, embedding, normalize, unembedding
from interplab.weights.factored import FactoredMatrix

Tensor = torch.Tensor
PATTERN_DETECTORS = ("previous_token", "duplicate_token", "induction")
WEIGHT_DETECTORS = ("copying", "copy_suppression")
DETECTORS = PATTERN_DETECTORS + WEIGHT_DETECTORS
CONTROL_SEED = 1_000_003


class DetectorScores(NamedTuple):
    """One detector's score of every head with its controls, each [n_layers, n_heads]."""

    score: Float[Tensor, "layer head"]
    sem: Float[Tensor, "layer head"] | None
    """Standard error over sequences (pattern scores); None for weight scores (exact)."""
    shuffled: Float[Tensor, "layer head"]
    """Control (a): random key position (pattern scores) or permuted output tokens (weight scores)."""
    shuffled_sem: Float[Tensor, "layer head"] | None
    random_weights: Float[Tensor, "layer head"]
    """Control (b): the same score on a freshly initialised model of the same shape."""
    random_weights_sem: Float[Tensor, "layer head"] | None


class HeadDetectors(NamedTuple):
    """Every detector of every head (see the module docstring)."""

    previous_token: DetectorScores
    duplicate_token: DetectorScores
    induction: DetectorScores
    copying: DetectorScores | None
    """None when the model has no token embedding matrix (table-embedding models)."""
    copy_suppression: DetectorScores | None
    n_seqs: int
    seq_len: int


class PatternStats(NamedTuple):
    """Per-sequence pattern scores of one model: [n_seqs, n_layers, n_heads] by detector, for the detector's key
    and for the random control key."""

    score: dict[str, Float[Tensor, "seq layer head"]]
    shuffled: dict[str, Float[Tensor, "seq layer head"]]


# ---- sequences --------------------------------------------------------------------------------------------------
def token_pool(model: HookedModel) -> tuple[int | None, Int[Tensor, " n"]]:
    """(BOS id or None, the ids R is drawn from): every id below d_vocab the tokenizer knows that is not special.
    Models without a tokenizer (toy models) use id 0 as BOS and draw from 1 … d_vocab − 1."""
    tok, vocab = model.tokenizer, model.info.d_vocab
    if tok is None:
        return 0, torch.arange(1, vocab)
    specials = set(getattr(tok, "all_special_ids", []) or [])
    bos = getattr(tok, "bos_token_id", None)
    specials |= {bos} if bos is not None else set()
    n_known = min(vocab, len(tok) if hasattr(tok, "__len__") else getattr(tok, "vocab_size", vocab))
    keep = torch.ones(n_known, dtype=torch.bool)
    keep[[i for i in specials if 0 <= i < n_known]] = False
    return bos, keep.nonzero().squeeze(1)


def repeated_tokens(model: HookedModel, n_seqs: int, seq_len: int, seed: int) -> Int[Tensor, "n_seqs pos"]:
    """[BOS, R, R] per row (no BOS when the tokenizer has none), R of `seq_len` ids uniform over `token_pool`."""
    bos, pool = token_pool(model)
    n_pos = 2 * seq_len + (bos is not None)
    if pool.numel() < 2:
        raise InterplabError(f"{model.info.spec} has {pool.numel()} non-special token ids; detectors need >= 2")
    if n_pos > model.info.n_ctx:
        raise InterplabError(f"--seq-len {seq_len} gives {n_pos} positions, more than {model.info.spec}'s context "
                             f"of {model.info.n_ctx}; use --seq-len <= {(model.info.n_ctx - (bos is not None)) // 2}")
    gen = torch.Generator().manual_seed(seed)
    half = pool[torch.randint(pool.numel(), (n_seqs, seq_len), generator=gen)]
    parts = [half, half] if bos is None else [torch.full((n_seqs, 1), bos), half, half]
    return torch.cat(parts, dim=1)


# ---- pattern statistics -----------------------------------------------------------------------------------------
def detector_keys(seq_len: int, offset: int) -> dict[str, Int[Tensor, " L"]]:
    """The key each detector reads for the queries of the second copy (positions offset + L … offset + 2L − 1,
    where `offset` = 1 with BOS, 0 without)."""
    queries = torch.arange(seq_len) + offset + seq_len
    return {"previous_token": queries - 1, "duplicate_token": queries - seq_len,
            "induction": queries - seq_len + 1}


def random_keys(targets: Int[Tensor, " L"], offset: int, n_seqs: int, gen: torch.Generator) -> Int[Tensor, "n L"]:
    """For each (sequence, query q), one key uniform over offset … q other than the query's target."""
    queries = torch.arange(targets.numel()) + targets.numel() + offset
    n_choices = queries - offset  # positions offset … q, minus the target
    draw = (torch.rand(n_seqs, targets.numel(), generator=gen) * n_choices).long() + offset
    return draw + (draw >= targets).long()


def pattern_statistics(
    pattern: Float[Tensor, "batch head pos pos"], keys: Int[Tensor, " L"] | Int[Tensor, "batch L"], seq_len: int,
    offset: int,
) -> Float[Tensor, "batch head"]:
    """Mean over the second copy's queries of the attention each query pays to its key (one key per query, shared
    by the batch or per sequence)."""
    queries = torch.arange(seq_len, device=pattern.device) + offset + seq_len
    rows = pattern[:, :, queries, :].float()  # [batch head L pos]
    index = keys.to(pattern.device).expand(pattern.shape[0], seq_len)[:, None, :, None]
    return rows.gather(-1, index.expand(-1, pattern.shape[1], -1, -1)).squeeze(-1).mean(-1)


def pattern_stats(model: HookedModel, tokens: Int[Tensor, "n pos"], seq_len: int, batch_size: int, seed: int
                  ) -> PatternStats:
    """Per-sequence pattern scores (and their random-key control) of every head of `model` on `tokens`."""
    offset = tokens.shape[1] - 2 * seq_len
    keys = detector_keys(seq_len, offset)
    gen = torch.Generator().manual_seed(seed + 1)
    controls = {name: random_keys(k, offset, tokens.shape[0], gen) for name, k in keys.items()}
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.info.n_layers)]
    score: dict[str, list[Tensor]] = {name: [] for name in keys}
    shuffled: dict[str, list[Tensor]] = {name: [] for name in keys}
    for start in range(0, tokens.shape[0], batch_size):
        cache = model.run_with_cache(tokens[start:start + batch_size], names).cache
        for name, k in keys.items():
            ctrl = controls[name][start:start + batch_size]
            score[name].append(torch.stack([pattern_statistics(cache[n], k, seq_len, offset) for n in names], 1))
            shuffled[name].append(torch.stack([pattern_statistics(cache[n], ctrl, seq_len, offset)
                                               for n in names], 1))
    return PatternStats({n: torch.cat(v).cpu() for n, v in score.items()},
                        {n: torch.cat(v).cpu() for n, v in shuffled.items()})


def mean_sem(per_seq: Float[Tensor, "seq layer head"]
             ) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """Mean over sequences and its standard error std / sqrt(n) (ddof 1)."""
    return per_seq.mean(0), per_seq.std(0, unbiased=True) / per_seq.shape[0] ** 0.5


# ---- weight statistics ------------------------------------------------------------------------------------------
def copying_scores(model: HookedModel, seed: int) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """(copying score, copying score with the output tokens permuted) of every head's full OV circuit, through the
    d_head × d_head product W_O (W_U x̂_E) W_V (see the module docstring)."""
    W_E = normalize(model, embedding(model))
    W_U, _ = unembedding(model)
    # Centre the unembedding over the vocabulary (TransformerLens's center_unembed): the softmax ignores a shift
    # shared by every logit, but a direction every token's embedding and unembedding share (large in tied models)
    # would otherwise add one big positive eigenvalue to every head and to the permuted control alike.
    W_U = W_U - W_U.mean(1, keepdim=True)
    perm = torch.randperm(W_U.shape[1], generator=torch.Generator().manual_seed(seed + 2)).to(W_U.device)
    UE, UE_perm = W_U @ W_E, W_U[:, perm] @ W_E  # (U P) E: P permutes the output tokens
    scores, shuffled = [], []
    for layer in range(model.info.n_layers):
        attn = attention_weights(model, layer)
        scores.append(copying_score(FactoredMatrix(attn.W_V, attn.W_O @ UE)))
        shuffled.append(copying_score(FactoredMatrix(attn.W_V, attn.W_O @ UE_perm)))
    return torch.stack(scores).cpu(), torch.stack(shuffled).cpu()


def has_token_embedding(model: HookedModel) -> bool:
    """Whether the model embeds tokens through a W_E matrix (table-embedding models read a table instead)."""
    return not isinstance(model, ToyTransformer) or type(model)._embed is ToyTransformer._embed


# ---- the control model ------------------------------------------------------------------------------------------
def random_weights_model(model: HookedModel, seed: int) -> HookedModel:
    """A model of the same shape, freshly initialised: HF models from their config (under torch seed
    CONTROL_SEED + `seed`, not `seed` itself, which may be the very seed a random test model was made with), toy
    models with the same ToyConfig and seed model.cfg.seed + 1 + `seed`."""
    if isinstance(model, ToyTransformer):
        fresh = type(model)(replace(model.cfg, seed=model.cfg.seed + 1 + seed), spec=f"{model.info.spec} (random)")
        fresh.tokenizer = model.tokenizer
        return fresh.to(model.device).eval()
    if isinstance(model, HFHookedModel):
        config = copy.deepcopy(model.model.config)
        dtype = next(model.model.parameters()).dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CONTROL_SEED + seed)
            fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return HFHookedModel(fresh.to(model.device), model.tokenizer, f"{model.info.spec} (random)")
    raise InterplabError(f"cannot build a random-weights control of {type(model).__name__}; supported: the toy "
                         "transformer and HF models")


# ---- all detectors ----------------------------------------------------------------------------------------------
def detect_heads(model: HookedModel, *, n_seqs: int = 32, seq_len: int = 32, batch_size: int = 8, seed: int = 0,
                 control: HookedModel | None = None) -> HeadDetectors:
    """Every detector of every head of `model`, beside the random-key / permuted-token control and the
    random-weights control (`control`, or `random_weights_model(model, seed)`). See the module docstring."""
    check_int("n_seqs", n_seqs, 2)
    check_int("seq_len", seq_len, 2)
    check_int("batch_size", batch_size, 1)
    tokens = repeated_tokens(model, n_seqs, seq_len, seed)
    control = control if control is not None else random_weights_model(model, seed)
    if (control.info.n_layers, control.info.n_heads) != (model.info.n_layers, model.info.n_heads):
        raise InterplabError(f"the control model has {control.info.n_layers} × {control.info.n_heads} heads, the "
                             f"model {model.info.n_layers} × {model.info.n_heads}; they must match")
    real, rand = (pattern_stats(m, tokens, seq_len, batch_size, seed) for m in (model, control))
    found: dict[str, DetectorScores | None] = {}
    for name in PATTERN_DETECTORS:
        (score, sem), (shuf, shuf_sem), (rnd, rnd_sem) = (mean_sem(x) for x in
                                                          (real.score[name], real.shuffled[name], rand.score[name]))
        found[name] = DetectorScores(score, sem, shuf, shuf_sem, rnd, rnd_sem)
    if has_token_embedding(model):
        (copy_score, copy_shuf), (copy_rand, _) = copying_scores(model, seed), copying_scores(control, seed)
        found["copying"] = DetectorScores(copy_score, None, copy_shuf, None, copy_rand, None)
        found["copy_suppression"] = DetectorScores(-copy_score, None, -copy_shuf, None, -copy_rand, None)
    else:
        found["copying"] = found["copy_suppression"] = None
    return HeadDetectors(**found, n_seqs=n_seqs, seq_len=seq_len)  # type: ignore[arg-type]


def top_heads(scores: DetectorScores, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of highest score, highest first."""
    flat = scores.score.flatten()
    order = flat.argsort(descending=True)[:k]
    n_heads = scores.score.shape[1]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]
