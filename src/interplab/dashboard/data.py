"""The data of a feature dashboard, computed in one streaming pass over a corpus: `build_dashboard_data`.

    from interplab.dashboard.configs import DashboardConfig
    from interplab.dashboard.data import build_dashboard_data
    build_dashboard_data(DashboardConfig(sae="saes/topk-k32", tokens=200_000, out="site"))   # writes site/data/

The pass reads `cfg.tokens` tokens of the corpus in contexts of `ctx_len` through the model up to the SAE's hook
(the forward pass stops there), encodes them, and feeds the codes to `stats.LatentStats`; only the token ids of the
contexts (int32) and bounded per-latent state are kept, never the activations. The windows of the chosen examples
are gathered from each batch while it is in memory (see stats.py), so the pass is the only forward pass. Then come
the logit effects (W_dec W_U, see `logit_directions`), the correlations, and `store.write_site_data`, which writes
every file atomically and meta.js last: an interrupted build leaves no half-written data/ that looks complete, and
is simply run again (there is no resume; the pass is one forward over the corpus).

Every example is {"tokens", "acts", "max_pos", "context", "position"}: a window of `window[0]` tokens before and
`window[1]` after the example's token, cut at the edges of its context (contexts are separate forward passes);
`max_pos` indexes the example's token in the window (for top examples the context's maximum, for quantile samples
the sampled firing); `context` is the context's index in the stream read and `position` the token's index in it
(stream offset = context · ctx_len + position). Floats are rounded to 4 significant digits.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Iterator

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from interplab.config import DEFAULT_MODEL
from interplab.dashboard import store
from interplab.dashboard.assemble import assemble
from interplab.dashboard.configs import DashboardConfig
from interplab.dashboard.stats import LatentStats, logit_effects
from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.hooks import parse_block_hook
from interplab.models.tokens import ByteTokenizer
from interplab.sae.base import SparseAutoencoder
from interplab.sae.loading import load_sae_and_model
from interplab.weights.extract import mlp_weights, normalize, unembedding

if TYPE_CHECKING:  # for the annotation only, as in models.hooked
    from transformers import PreTrainedTokenizerBase

N_TOP_LOGITS = 10
MAX_CORRELATED_LATENTS = 16384
"""Latent-latent correlations need the d_sae² co-occurrence matrix (float32: 1 GiB at 16,384 latents); larger
dictionaries get no `corr_latents` (empty lists, meta "corr_latents": false)."""


# ---- inputs ---------------------------------------------------------------------------------------------------
def place_label(spec: str, site: str) -> str:
    """How the site names a model, SAE or corpus `spec` without telling where the files of the machine are: a local
    path inside the folder that holds the site (or the site itself) as a path relative to the site ("../saes/k32"),
    another local path by its name alone, and anything that is not a local path (a hub id, a built-in corpus, an
    s3:// URL) as given. The site is meant to be shared; an absolute path would show a user name and a layout."""
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    if not path or "://" in path or not (os.path.isabs(path) or os.path.exists(path)):
        return spec
    path = os.path.abspath(path)
    name = os.path.basename(path.rstrip(os.sep)) or spec
    local_site = site[len("file://"):] if site.startswith("file://") else site
    if "://" in local_site:
        return name
    site_dir = os.path.abspath(local_site)
    parent = os.path.dirname(site_dir)
    if path != parent and not path.startswith(parent.rstrip(os.sep) + os.sep):
        return name
    return os.path.relpath(path, site_dir).replace(os.sep, "/")


def collect_contexts(cfg: DashboardConfig, tokenizer: PreTrainedTokenizerBase | ByteTokenizer,
                     ) -> Int[torch.Tensor, "n_contexts ctx_len"]:
    """The first ceil(tokens / ctx_len) contexts of the corpus, int32 [n_contexts, ctx_len] on the CPU."""
    want = -(-cfg.tokens // cfg.ctx_len)
    out = []
    for ctx in iter_contexts(cfg.corpus, tokenizer, cfg.ctx_len, split=cfg.split, seed=cfg.seed,
                             test_fraction=cfg.test_fraction):
        out.append(ctx)
        if len(out) == want:
            break
    if not out:
        raise InterplabError(f"corpus {cfg.corpus!r} ({cfg.split}) has no context of {cfg.ctx_len} tokens")
    return torch.stack(out).to(torch.int32)


def neuron_hook(model: HookedModel, hook: str) -> str | None:
    """`blocks.L.mlp.hook_post` of the block holding `hook`, or None (no block, or no MLP)."""
    parsed = parse_block_hook(hook)
    name = f"blocks.{parsed[0]}.mlp.hook_post" if parsed else None
    return name if name and model.info.d_mlp and name in model.hook_names else None


@torch.no_grad()
def read_batch(model: HookedModel, sae: SparseAutoencoder, hook: str, tokens: Int[torch.Tensor, "batch pos"],
               mlp_hook: str | None = None,
               ) -> tuple[Float[torch.Tensor, "batch pos d_sae"], Float[torch.Tensor, "batch pos d_mlp"] | None]:
    """(SAE codes [batch, pos, d_sae], MLP neurons [batch, pos, d_mlp] or None) of a batch of contexts; the
    forward pass stops after the later of the two hooks."""
    names = [hook] + ([mlp_hook] if mlp_hook else [])
    cache = model.run_with_cache(tokens.to(model.device, torch.long), names).cache
    codes = sae.encode(cache[hook].to(sae.W_enc.dtype))
    return codes, (cache[mlp_hook] if mlp_hook else None)


def logit_directions(model: HookedModel, sae: SparseAutoencoder, hook: str,
                     ) -> tuple[Float[torch.Tensor, "d_sae d_model"], Float[torch.Tensor, "d_model d_vocab"]] | None:
    """(what each latent adds to the residual stream [d_sae, d_model], W_U [d_model, d_vocab]) or None.

    W_U is the unembedding with the final norm's scale folded in (`weights.extract.unembedding`), so W_dec W_U is
    the direct effect on the logits of a latent's decoder direction added to the final residual stream, up to the
    norm's positive per-token factor 1/rms (exact ranking). For LayerNorm models the norm also removes the mean
    over d_model, so the columns of W_U are centred: (d − mean(d)) · w = d · (w − mean(w)). Latents of an
    `mlp.hook_post` SAE write through the layer's W_out; other hooks whose width is not d_model get None.
    """
    W_dec = sae.W_dec.detach().float()
    d_model = model.info.d_model
    block = parse_block_hook(hook)
    if block is not None and block[1] == "mlp.hook_post":
        W_dec = W_dec @ mlp_weights(model, block[0], fold_norm=False).W_out.to(W_dec)
    elif model.hook_dim(hook) != d_model or W_dec.shape[1] != d_model:
        return None
    W_U = unembedding(model)[0].to(W_dec)
    ones = torch.ones(1, d_model, device=W_U.device)
    if normalize(model, ones).abs().max() < 1e-3:  # only a centring norm maps the all-ones vector to 0
        W_U = W_U - W_U.mean(0, keepdim=True)
    return W_dec, W_U


# ---- the build ------------------------------------------------------------------------------------------------
def build_dashboard_data(cfg: DashboardConfig, *, model: HookedModel | None = None,
                         sae: SparseAutoencoder | None = None) -> dict[str, Any]:
    """Run the pass, compute every latent's data and write `cfg.out`/data/; return a summary with timings.

    `model` and `sae`, when given, are used instead of loading `cfg.model` and `cfg.sae` (which then only label)."""
    if sae is not None and not cfg.sae:
        cfg = replace(cfg, sae="(in memory)")
    cfg.validate()
    t_start = time.perf_counter()
    loaded = load_sae_and_model(cfg.sae, cfg.model, cfg.hook, cfg.device, loaded_sae=sae, loaded_model=model,
                                default_model=DEFAULT_MODEL)
    sae, model, hook, spec = loaded
    if cfg.ctx_len > model.info.n_ctx:
        raise InterplabError(f"--ctx-len {cfg.ctx_len} exceeds the model's context length {model.info.n_ctx}")
    if model.tokenizer is None:
        raise InterplabError(f"{spec} has no tokenizer; the dashboard needs one to read a corpus")
    mlp_hook = neuron_hook(model, hook) if cfg.neurons else None
    contexts = collect_contexts(cfg, model.tokenizer)
    n_ctx, T = contexts.shape
    stats = LatentStats(sae.cfg.d_sae, top_k=cfg.top_k, window=tuple(cfg.window), n_samples=cfg.quantile_examples,
                        d_mlp=model.info.d_mlp if mlp_hook else None,
                        correlate=sae.cfg.d_sae <= MAX_CORRELATED_LATENTS,
                        active_per_token=sae.cfg.k if sae.cfg.arch == "topk" else None,
                        device=model.device, seed=cfg.seed)
    t_setup = time.perf_counter()
    forward_s = stats_s = 0.0
    bar = tqdm(iter_batches(contexts, cfg.batch_size), total=-(-n_ctx // cfg.batch_size), desc="dashboard",
               unit="batch")
    for start, batch in bar:
        t0 = time.perf_counter()
        codes, neurons = read_batch(model, sae, hook, batch, mlp_hook)
        t1 = time.perf_counter()
        stats.update(codes, start * T, neurons)
        _sync(codes)
        t2 = time.perf_counter()
        forward_s, stats_s = forward_s + t1 - t0, stats_s + t2 - t1
    t_pass = time.perf_counter()
    directions = logit_directions(model, sae, hook)
    logits = logit_effects(*directions, n_top=N_TOP_LOGITS) if directions is not None else None
    meta, index, chunks = assemble(cfg, stats, logits, contexts, model.tokenizer,
                                   info={"sae": place_label(cfg.sae, cfg.out), "model": place_label(spec, cfg.out),
                                         "corpus": place_label(cfg.corpus, cfg.out), "hook": hook,
                                         "neuron_hook": mlp_hook})
    t_final = time.perf_counter()
    store.write_site_data(cfg.out, meta, index, chunks)
    t_end = time.perf_counter()
    return {"data": store.data_dir(cfg.out), "n_tokens": n_ctx * T, "n_contexts": n_ctx, "d_sae": sae.cfg.d_sae,
            "hook": hook, "model": spec, "config": asdict(cfg),
            "labels": {k: meta[k] for k in ("sae", "model", "corpus")},  # as the site names them
            "setup_s": t_setup - t_start, "forward_s": forward_s, "stats_s": stats_s,
            "finalize_s": t_final - t_pass, "write_s": t_end - t_final, "total_s": t_end - t_start}


def _sync(t: torch.Tensor) -> None:
    """Wait for queued GPU work, so that the timings measure it (a no-op on the CPU)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def iter_batches(contexts: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first context index, batch) over `contexts` in the order the build reads them."""
    for start in range(0, contexts.shape[0], batch_size):
        yield start, contexts[start:start + batch_size]
