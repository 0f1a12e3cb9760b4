"""Reading a weight matrix's singular directions through the vocabulary (Millidge & Black 2022; Nabeshima).

Every matrix here has a side in the residual stream. Its top singular vectors on that side are directions the
matrix reads or writes; projecting a direction v onto the unembedding, logits = v W_U (final norm scale folded in),
says which tokens it would promote (top) or suppress (bottom) if it reached the output. Singular vectors have an
arbitrary sign, so both ends are listed.

    matrix    factor(s)              residual-side directions
    ov        W_V W_O (per head)     writes: right singular vectors
    qk        W_Q W_Kᵀ (per head)    query: left, key: right
    mlp-in    W_in [d_model, d_mlp]  reads: left     (mlp-gate: W_gate, the gated MLPs' other input)
    mlp-out   W_out [d_mlp, d_model] writes: right
    embed     W_E [d_vocab, d_model] embeds: right
    unembed   W_U [d_model, d_vocab] unembeds: left

Interpretability proxies, each beside the same number for random residual directions (the control: projecting any
direction through W_U selects tokens whose unembeddings are alike, so only the excess over random means anything):
- kind share: of the top-k tokens at one end, the share of the most common token kind (word, Capitalised word,
  subword, number, punctuation, whitespace, non-ASCII, mixed); averaged over both ends;
- coherence: mean pairwise cosine of the top-k tokens' unembedding columns; averaged over both ends.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple, Sequence

import torch
from jaxtyping import Float

from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.tokens import token_text
from interplab.weights.circuits import ov_circuit, qk_circuit
from interplab.weights.configs import MATRICES, PER_HEAD
from interplab.weights.extract import attention_weights, embedding, mlp_weights, unembedding

Tensor = torch.Tensor

PER_LAYER = ("ov", "qk", "mlp-in", "mlp-gate", "mlp-out")


class Directions(NamedTuple):
    """The top singular directions of one matrix, on its residual-stream side(s)."""

    name: str
    """Which matrix: e.g. `L3.H2 ov`, `L3 mlp-out`, `embed`."""
    S: Float[Tensor, " r"]
    """Singular values, descending (all of them, for the spectrum)."""
    sides: dict[str, Float[Tensor, "n d_model"]]
    """Side name (writes, reads, query, key, ...) → the top n unit directions, one per row."""


def matrix_directions(model: HookedModel, what: str, layer: int | None, head: int | None,
                      n: int) -> list[Directions]:
    """The top `n` singular directions of one kind of matrix: one `Directions` per head (ov/qk, all heads when
    `head` is None) or one for the layer (MLP) or the model (embed/unembed)."""
    check_matrix(model, what, layer, head)
    if what in PER_HEAD:
        circuits = (ov_circuit if what == "ov" else qk_circuit)(attention_weights(model, layer))
        heads = range(model.info.n_heads) if head is None else [head]
        out = []
        for h in heads:
            U, S, V = circuits[h].svd()
            sides = {"writes": V} if what == "ov" else {"query": U, "key": V}
            out.append(Directions(f"L{layer}.H{h} {what}", S, {k: v[:, :n].T for k, v in sides.items()}))
        return out
    if what in ("embed", "unembed"):
        matrix = embedding(model) if what == "embed" else unembedding(model)[0]
        name = what
    else:
        mlp = mlp_weights(model, layer)
        matrix = {"mlp-in": mlp.W_in, "mlp-gate": mlp.W_gate, "mlp-out": mlp.W_out}[what]
        name = f"L{layer} {what}"
    U, S, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    side, vectors = {"mlp-in": ("reads", U.T), "mlp-gate": ("reads", U.T), "mlp-out": ("writes", Vh),
                     "embed": ("embeds", Vh), "unembed": ("unembeds", U.T)}[what]
    return [Directions(name, S, {side: vectors[:n]})]


def check_matrix(model: HookedModel, what: str, layer: int | None, head: int | None) -> None:
    """Clear errors for a matrix, layer or head the model does not have."""
    info = model.info
    if what not in MATRICES:
        raise InterplabError(f"unknown matrix {what!r}; valid: {', '.join(MATRICES)}")
    if what in PER_LAYER:
        if layer is None or not 0 <= layer < info.n_layers:
            raise InterplabError(f"{what} needs --layer in [0, {info.n_layers - 1}] ({info.spec} has "
                                 f"{info.n_layers} layers), got {layer}")
        if what.startswith("mlp") and info.d_mlp is None:
            raise InterplabError(f"{info.spec} is attention-only: it has no {what} matrix")
        if what == "mlp-gate" and mlp_weights(model, layer).W_gate is None:
            raise InterplabError(f"{info.spec} ({info.arch}) has no gated MLP, so no mlp-gate matrix; use mlp-in")
    if head is not None:
        if what not in PER_HEAD:
            raise InterplabError(f"--head applies to ov and qk only, not {what}")
        if not 0 <= head < info.n_heads:
            raise InterplabError(f"head {head} is out of range: {info.spec} has {info.n_heads} heads per layer "
                                 f"(0..{info.n_heads - 1})")


# ---- reading directions through the vocabulary --------------------------------------------------------------------
class Vocabulary(NamedTuple):
    """What reading a direction needs: the folded unembedding and each token's text and kind."""

    W_U: Float[Tensor, "d_model d_vocab"]
    unit_columns: Float[Tensor, "d_vocab d_model"]
    """Unembedding columns scaled to unit norm (for the coherence proxy)."""
    texts: list[str]
    kinds: list[str] | None
    """None when the model has no tokenizer (token kinds would be meaningless)."""


def vocabulary(model: HookedModel) -> Vocabulary:
    W_U = unembedding(model)[0].float()
    n_vocab = W_U.shape[1]
    tokenizer = model.tokenizer
    texts = [token_text(tokenizer, i) for i in range(n_vocab)]
    kinds = None if tokenizer is None else [token_kind(t) for t in texts]
    unit = W_U.T / W_U.norm(dim=0)[:, None].clamp_min(1e-12)
    return Vocabulary(W_U, unit, texts, kinds)


def token_kind(text: str) -> str:
    """A coarse class of a token's text: whitespace, number, word, Word, subword, Subword, punctuation, mixed,
    non-ascii. A leading space marks a word start (BPE vocabularies spell it into the token)."""
    if not text.isascii():
        return "non-ascii"
    if not text or text.isspace():
        return "whitespace"
    core = text.lstrip()
    if core.isdigit():
        return "number"
    if core.isalpha():
        kind = "word" if core != text else "subword"
        return kind.capitalize() if core[0].isupper() else kind
    if not any(c.isalnum() for c in core):
        return "punctuation"
    return "mixed"


class Reading(NamedTuple):
    """One direction read through the vocabulary."""

    top: list[tuple[str, float]]
    """The k tokens it promotes most, with their logit."""
    bottom: list[tuple[str, float]]
    """The k tokens it suppresses most (its negative end)."""
    kind_share: float | None
    coherence: float


def read_directions(vocab: Vocabulary, directions: Float[Tensor, "n d_model"], k: int) -> list[Reading]:
    """Project each direction onto the vocabulary: its top and bottom k tokens and the two proxies."""
    logits = directions.to(vocab.W_U) @ vocab.W_U  # [n, d_vocab]
    top_vals, top_ids = logits.topk(k, dim=-1)
    bottom_vals, bottom_ids = (-logits).topk(k, dim=-1)
    readings = []
    for i in range(len(directions)):
        ends = (top_ids[i].tolist(), bottom_ids[i].tolist())
        readings.append(Reading(
            top=[(vocab.texts[t], float(v)) for t, v in zip(ends[0], top_vals[i])],
            bottom=[(vocab.texts[t], -float(v)) for t, v in zip(ends[1], bottom_vals[i])],
            kind_share=None if vocab.kinds is None else sum(_kind_share(vocab.kinds, e) for e in ends) / 2,
            coherence=sum(_coherence(vocab.unit_columns, e) for e in ends) / 2,
        ))
    return readings


def _kind_share(kinds: list[str], ids: Sequence[int]) -> float:
    return Counter(kinds[i] for i in ids).most_common(1)[0][1] / len(ids)


def _coherence(unit_columns: Tensor, ids: Sequence[int]) -> float:
    """Mean cosine over distinct pairs of the tokens' unembedding columns."""
    cols = unit_columns[list(ids)]
    n = len(ids)
    gram = cols @ cols.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def random_directions(d_model: int, n: int, seed: int) -> Float[Tensor, "n d_model"]:
    """The control: n isotropic Gaussian unit directions of the residual stream (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, d_model, generator=gen)
    return dirs / dirs.norm(dim=-1, keepdim=True)


def proxy_summary(readings: Sequence[Reading]) -> dict[str, Any]:
    """Mean and standard deviation of each proxy over a set of readings."""
    out: dict[str, Any] = {"n": len(readings)}
    for proxy in ("kind_share", "coherence"):
        values = torch.tensor([float(getattr(r, proxy)) for r in readings if getattr(r, proxy) is not None])
        out[proxy] = None if len(values) == 0 else {"mean": float(values.mean()),
                                                    "std": float(values.std()) if len(values) > 1 else 0.0}
    return out
