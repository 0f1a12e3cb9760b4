"""From the streaming statistics to the objects `interplab.dashboard.store` writes: meta, index and latents.

Everything is computed on whole arrays first (windows, token texts, rounding, the choice of quantile samples); the
loop over latents then only slices Python lists, so that tens of thousands of latents take seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from interplab.dashboard import store
from interplab.dashboard.configs import DashboardConfig
from interplab.dashboard.stats import LatentStats
from interplab.models.tokens import ByteTokenizer

if TYPE_CHECKING:  # for the annotation only, as in models.hooked
    from transformers import PreTrainedTokenizerBase

N_CORRELATED = 10


def token_strings(tokenizer: PreTrainedTokenizerBase | ByteTokenizer, ids: np.ndarray) -> dict[int, str]:
    """Readable text of each token id (leading spaces kept): decoded alone, raw (never HTML-escaped)."""
    ids = sorted({int(i) for i in ids})
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    # the byte tokenizer has no pieces (and no word-start markers to restore)
    pieces = (tokenizer.convert_ids_to_tokens(ids) if hasattr(tokenizer, "convert_ids_to_tokens")
              else [None] * len(ids))
    out = {}
    for i, text, piece in zip(ids, texts, pieces):
        # sentencepiece decoders drop the word-start marker of a lone token; put its space back
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        out[i] = text
    return out


def round_sig(a: Any, digits: int = 4) -> np.ndarray:
    """`a` rounded to `digits` significant digits (float64; 0, NaN and ±inf unchanged), so the JSON stays short.

    The power of ten is applied on the side where it is an exact integer, so that the float printed is the
    shortest decimal (0.1234, not 0.12340000000000001)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        e = (digits - 1) - np.floor(np.log10(np.abs(a)))               # decimals to keep
        e = np.where(np.isfinite(e), e, 0.0)
        scale = np.power(10.0, np.abs(e))
        out = np.where(e >= 0, np.round(a * scale) / scale, np.round(a / scale) * scale)
    return np.where(np.isfinite(a), out, a)


def examples(tok: np.ndarray, acts: np.ndarray, before: int, after: int,
             words: list[list[str]]) -> list[dict[str, Any]]:
    """The example centred on each stream token tok[j], with window activations acts[j] (before + 1 + after
    values, already rounded), cut at the edges of its context; words[c] is the text of context c's tokens."""
    T = len(words[0])
    ctx, pos = np.divmod(tok.astype(np.int64), T)
    lo, hi = np.maximum(0, pos - before), np.minimum(T, pos + after + 1)
    values = np.asarray(acts).reshape(-1, before + after + 1).tolist()
    return [{"tokens": words[c][a:b], "acts": v[a - p + before:b - p + before], "max_pos": p - a, "context": c,
             "position": p}
            for v, a, b, c, p in zip(values, lo.tolist(), hi.tolist(), ctx.tolist(), pos.tolist())]


def split(items: list, counts: np.ndarray) -> list[list]:
    """`items` cut into consecutive runs of the given lengths."""
    ends = np.cumsum(counts).tolist()
    return [items[s:e] for s, e in zip([0] + ends[:-1], ends)]


def quantile_picks(stats: LatentStats, max_act: np.ndarray, Q: int, m: int, T: int) -> tuple[np.ndarray, ...]:
    """The kept samples shown per (latent, quantile bin): (latent, bin, sample slot) arrays sorted by latent, bin
    and random priority; at most m per bin, one per context. Bin j of latent i is (j/Q, (j+1)/Q] × max_act[i]."""
    d = stats.d_sae
    val = stats.smp_val.view(d, -1).cpu().numpy().astype(np.float64)
    key = stats.smp_key.view(d, -1).cpu().numpy()
    tok = stats.smp_tok.view(d, -1).cpu().numpy()
    lat, slot = np.nonzero(np.isfinite(key) & (val > 0) & (tok >= 0))
    v = val[lat, slot]
    q = (v[:, None] > max_act[lat, None] * (np.arange(1, Q) / Q)[None]).sum(1)
    order = np.lexsort((key[lat, slot], q, lat))
    lat, slot, q = lat[order], slot[order], q[order]
    group = lat * Q + q
    ctx = tok[lat, slot] // T
    _, first = np.unique(group * (int(ctx.max(initial=0)) + 1) + ctx, return_index=True)
    first.sort()                                                       # keeps the first of each context
    lat, slot, q, group = lat[first], slot[first], q[first], group[first]
    rank = np.arange(len(group)) - np.searchsorted(group, group)
    keep = rank < m
    return lat[keep], q[keep], slot[keep]


def _pair_lists(ids: np.ndarray, r: np.ndarray) -> list[list[list]]:
    return [[[i, x] for i, x in zip(a, b) if x == x] for a, b in zip(ids.tolist(), round_sig(r).tolist())]


def assemble(cfg: DashboardConfig, stats: LatentStats, logits: dict[str, torch.Tensor] | None,
             contexts: torch.Tensor, tokenizer: PreTrainedTokenizerBase | ByteTokenizer,
             info: dict[str, Any]) -> tuple[dict, dict, Iterator[list[dict]]]:
    """(meta, index, generator of chunks of latent objects) in the layout of `interplab.dashboard.store`."""
    d, T, n = stats.d_sae, contexts.shape[1], stats.n_tokens
    before, after = cfg.window
    Q, m, K = cfg.quantile_bins, cfg.quantile_examples, cfg.top_k
    stream = contexts.flatten().cpu().numpy()
    lg = {k: v.cpu().numpy() for k, v in logits.items()} if logits is not None else None
    vocab = token_strings(tokenizer, np.concatenate(
        [np.unique(stream)] + ([lg["top_ids"].ravel(), lg["bot_ids"].ravel()] if lg else [])))
    text = np.empty(max(vocab) + 1, dtype=object)
    text[list(vocab)] = list(vocab.values())
    words = text[stream].reshape(-1, T).tolist()

    count = stats.count.cpu().numpy()
    freq = round_sig(count / max(n, 1), 6)
    mean_act = round_sig(np.where(count > 0, stats.sum.cpu().numpy() / np.maximum(count, 1), 0.0))
    top_val, top_tok = stats.top_val.cpu().numpy(), stats.top_tok.cpu().numpy()
    top_ok = (top_val > 0) & (top_tok >= 0)
    exact_max = np.where(top_ok[:, 0], top_val[:, 0], 0.0).astype(np.float64)
    max_act = round_sig(exact_max)

    top_lat, top_j = np.nonzero(top_ok)                                # latent order, best first
    top_win = stats.top_win.cpu().numpy()[top_lat, top_j]
    top_win[:, before] = top_val[top_lat, top_j]                      # the exact value at the centre
    top = split(examples(top_tok[top_lat, top_j], round_sig(top_win), before, after, words),
                np.bincount(top_lat, minlength=d))

    q_lat, q_bin, q_slot = quantile_picks(stats, exact_max, Q, m, T)
    W = before + after + 1
    q_win = stats.smp_win.view(d, -1, W).cpu().numpy()[q_lat, q_slot]
    q_win[:, before] = stats.smp_val.view(d, -1).cpu().numpy()[q_lat, q_slot]
    q_tok = stats.smp_tok.view(d, -1).cpu().numpy()[q_lat, q_slot]
    per_bin = split(examples(q_tok, round_sig(q_win), before, after, words),
                    np.bincount(q_lat * Q + q_bin, minlength=d * Q))
    bin_edges = round_sig(exact_max[:, None] * (np.arange(Q + 1) / Q)[None]).tolist()

    corr = (_pair_lists(*(t.cpu().numpy() for t in stats.latent_correlations(N_CORRELATED)))
            if stats.pairs is not None else [[] for _ in range(d)])
    neurons = (_pair_lists(*(t.cpu().numpy() for t in stats.neuron_correlations(N_CORRELATED)))
               if stats.lat_neuron is not None else [[] for _ in range(d)])
    if lg:
        tops = [[list(p) for p in zip(t, v)] for t, v in zip(text[lg["top_ids"]].tolist(),
                                                              round_sig(lg["top_vals"]).tolist())]
        bots = [[list(p) for p in zip(t, v)] for t, v in zip(text[lg["bot_ids"]].tolist(),
                                                              round_sig(lg["bot_vals"]).tolist())]
        logit_hist = lg["hist"].tolist()
    hist = stats.hist.cpu().numpy().tolist()
    freq_l, max_l, mean_l = freq.tolist(), max_act.tolist(), mean_act.tolist()

    def latent(i: int) -> dict[str, Any]:
        return {"id": i, "freq": freq_l[i], "max_act": max_l[i], "mean_act": mean_l[i], "hist": hist[i],
                "top": top[i],
                "quantiles": [{"bin": bin_edges[i][j:j + 2], "examples": per_bin[i * Q + j]} for j in range(Q)],
                "logits": ({"top": tops[i], "bottom": bots[i], "hist": logit_hist[i]} if lg
                           else {"top": [], "bottom": [], "hist": []}),
                "corr_latents": corr[i], "corr_neurons": neurons[i]}

    chunk_size = cfg.chunk_size
    n_chunks = store.n_chunks_for(d, chunk_size)

    def chunks() -> Iterator[list[dict]]:
        for c in range(n_chunks):
            yield [latent(i) for i in range(c * chunk_size, min(d, (c + 1) * chunk_size))]

    meta = {"format": store.FORMAT, "sae": info["sae"], "model": info["model"], "hook": info["hook"],
            "corpus": info["corpus"], "split": cfg.split, "n_tokens": int(n), "n_contexts": int(contexts.shape[0]),
            "ctx_len": int(T), "d_sae": d, "chunk_size": chunk_size, "n_chunks": n_chunks,
            "window": [before, after], "top_k": K, "quantile_examples": m,
            "hist_edges": stats.hist_edges.cpu().tolist(),
            "logit_hist_edges": lg["edges"].tolist() if lg else [],
            "quantile_bins": [[j / Q, (j + 1) / Q] for j in range(Q)],
            "neuron_hook": info["neuron_hook"], "corr_latents": stats.pairs is not None, "seed": cfg.seed}
    index = {"id": list(range(d)), "freq": freq_l, "max_act": max_l, "mean_act": mean_l,
             "top_token": [t[0]["tokens"][t[0]["max_pos"]] if t else "" for t in top],
             "top_logit": [t[0][0] for t in tops] if lg else [""] * d}
    return meta, index, chunks()
