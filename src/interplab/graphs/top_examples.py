"""Top activating contexts of a graph's features: what the viewer shows when a feature node is clicked.

For each chosen feature f of layer l (a (layer, index) pair: one feature may sit at several prompt positions), over
N corpus contexts c read once,

    a_f(c, t) = enc_l(x_l(c))[t, f]        x_l = `blocks.{l}.mlp.hook_in`, enc_l the dictionary's layer-l encoder
    m_f(c)    = max_t a_f(c, t)            (positions holding BOS skipped when asked: its residual is an outlier)

and the k contexts with the largest m_f(c) > 0 are kept (ties: the earlier context), each as a window of decoded
tokens around its argmax t* (W tokens either side) with a_f at every token of the window.

Memory: one layer's [batch · ctx_len, d_sae] encoding lives at a time, inside its hook; only the chosen features'
columns leave it. The forward pass stops after the last layer needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from interplab.graphs.attribution import AttributionGraph
from interplab.graphs.prune import PruneResult
from interplab.models.hooked import HookedModel
from interplab.models.hooks import StopForward
from interplab.models.tokens import Decoder, token_text
from interplab.runs import JSONDict
from interplab.sae.mlp_dictionary import DictionarySource, MLPDictionary, as_dictionary, mlp_in

FeatureKey = tuple[int, int]
"""(layer, feature index) of a dictionary feature."""


class TopExample(NamedTuple):
    """One top activating context of a feature, cut to a window around its largest activation."""

    tokens: list[str]
    """The window's tokens, decoded one by one."""
    acts: list[float]
    """The feature's activation at each token of the window (a skipped BOS shows its own, uncounted, value)."""
    max: float
    """Its largest activation in the whole context (at the window's centre, unless the context's edge cuts it)."""
    context: int
    """Index of the context in the corpus stream (not written to graph.json; for tests and ties)."""
    pos: int
    """Position of the largest activation in the context."""

    def to_dict(self) -> JSONDict:
        """The graph.json form: {tokens, acts, max}."""
        return {"tokens": self.tokens, "acts": self.acts, "max": self.max}


class TopExamples(NamedTuple):
    """What one pass over the corpus found."""

    examples: dict[FeatureKey, list[TopExample]]
    """Each feature's top contexts, largest first ([] if it never fired)."""
    n_contexts: int
    """Contexts read (fewer than asked when the corpus ran out)."""


class _Board(NamedTuple):
    """Running top-k of one layer's chosen features: values [n, k] (−inf where empty) and the examples by rank."""

    values: Float[torch.Tensor, "n k"]
    examples: list[list[TopExample]]


def kept_features(graph: AttributionGraph, pruned: PruneResult, cap: int) -> list[FeatureKey]:
    """The distinct (layer, index) features of the pruned graph's kept feature nodes, most influential first (a
    feature's influence: the largest over its positions), at most `cap`."""
    rep, best = graph.rep, {}
    kept = pruned.node_mask[: graph.n_features].nonzero()[:, 0].tolist()
    for i in kept:
        key = (int(rep.feat_layer[i]), int(rep.feat_index[i]))
        best[key] = max(best.get(key, float("-inf")), float(pruned.influence[i]))
    return sorted(best, key=lambda key: (-best[key], key))[:cap]


def by_layer(features: Sequence[FeatureKey], device: torch.device) -> dict[int, Int[torch.Tensor, " n"]]:
    """The feature indices of each layer, layers ascending, in the order given."""
    out: dict[int, list[int]] = {}
    for layer, index in features:
        out.setdefault(layer, []).append(index)
    return {l: torch.tensor(out[l], dtype=torch.long, device=device) for l in sorted(out)}


def batches(contexts: Iterable[torch.Tensor], n_contexts: int, batch_size: int) -> Iterator[torch.Tensor]:
    """At most `n_contexts` contexts, stacked `batch_size` at a time (the last batch may be smaller)."""
    it = iter(itertools.islice(contexts, n_contexts))
    while chunk := list(itertools.islice(it, batch_size)):
        yield torch.stack(chunk)


@torch.no_grad()
def top_examples(model: HookedModel, dictionary: DictionarySource, features: Sequence[FeatureKey],
                 contexts: Iterable[Int[torch.Tensor, " ctx"]], *, n_contexts: int, k: int = 5, window: int = 8,
                 batch_size: int = 8, skip_token: int | None = None, progress: bool = True) -> TopExamples:
    """Each feature's top-k contexts (at most `n_contexts` of `contexts`, in order) by their largest activation,
    largest first; a feature that never fires gets []. Positions holding `skip_token` (BOS) are not counted."""
    dic = as_dictionary(dictionary)
    dic.check(model)
    cols = by_layer(list(dict.fromkeys(features)), dic.device)
    if not cols:
        return TopExamples({}, 0)
    boards = {l: _Board(torch.full((len(idx), k), float("-inf")), [[] for _ in idx]) for l, idx in cols.items()}
    tokenizer = model.tokenizer
    bar = tqdm(total=n_contexts, desc="top activations", unit="context", disable=not progress)
    seen = 0
    for batch in batches(contexts, n_contexts, batch_size):
        tokens = model.check_tokens(batch)
        acts = layer_acts(model, dic, cols, tokens)
        mask = torch.ones(tokens.shape, dtype=torch.bool) if skip_token is None else (tokens != skip_token).cpu()
        for l, a in acts.items():
            update(boards[l], a.cpu().double(), mask, tokens.cpu(), seen, window=window, tokenizer=tokenizer)
        seen += tokens.shape[0]
        bar.update(tokens.shape[0])
    bar.close()
    found = {(l, int(f)): boards[l].examples[j] for l, idx in cols.items() for j, f in enumerate(idx.tolist())}
    return TopExamples(found, seen)


def attach_examples(graph_json: JSONDict, examples: Mapping[FeatureKey, list[TopExample]]) -> int:
    """Give every feature node of graph.json whose (layer, feature) has been searched its "top_examples" (a list of
    {tokens, acts, max}); return how many nodes got them."""
    n = 0
    for node in graph_json["nodes"]:  # type: ignore[union-attr]
        key = (node["layer"], node["feature"])
        if node["type"] == "feature" and key in examples:
            node["top_examples"] = [e.to_dict() for e in examples[key]]
            n += 1
    return n


def layer_acts(model: HookedModel, dic: MLPDictionary, cols: Mapping[int, Int[torch.Tensor, " n"]],
               tokens: Int[torch.Tensor, "batch ctx"]) -> dict[int, Float[torch.Tensor, "batch ctx n"]]:
    """The chosen features' activations at each needed layer, from one forward pass stopped after the last one;
    each layer's full encoding is dropped inside its hook."""
    out: dict[int, torch.Tensor] = {}
    last = max(cols)

    def read(act: torch.Tensor, name: str) -> None:
        layer = int(name.split(".")[1])
        out[layer] = dic.encode(layer, act.to(dic.device, dic.dtype))[..., cols[layer]]
        if layer == last:
            raise StopForward

    with model.hooks([(mlp_in(l), read) for l in cols]):
        try:
            model.forward(tokens)
        except StopForward:
            pass
    return out


def update(board: _Board, acts: Float[torch.Tensor, "batch ctx n"], mask: torch.Tensor,
           tokens: Int[torch.Tensor, "batch ctx"], first: int, *, window: int, tokenizer: Decoder | None) -> None:
    """Merge one batch into the running top-k: each context's largest activation per feature, entered only where it
    beats the feature's current k-th (strictly: on a tie the earlier context stays)."""
    peak, where = acts.masked_fill(~mask[..., None], float("-inf")).max(dim=1)  # [batch, n]
    k = board.values.shape[1]
    enters = (peak > board.values[:, -1][None]) & (peak > 0)
    for b, j in enters.nonzero().tolist():  # contexts in order, so ties keep the earlier one
        value = float(peak[b, j])
        if value <= float(board.values[j, -1]):
            continue  # an earlier context of this batch raised the bar
        t = int(where[b, j])
        lo, hi = max(0, t - window), min(tokens.shape[1], t + window + 1)
        ids = tokens[b, lo:hi].tolist()
        ex = TopExample([token_text(tokenizer, i) for i in ids], acts[b, lo:hi, j].tolist(),
                        value, first + b, t)
        row = board.examples[j]
        rank = sum(1 for e in row if e.max >= value)
        row.insert(rank, ex)
        del row[k:]
        board.values[j, : len(row)] = torch.tensor([e.max for e in row], dtype=board.values.dtype)
