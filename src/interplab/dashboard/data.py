"""The data of a feature dashboard, computed in one streaming pass over a corpus: `build_dashboard_data`.

    from interplab.dashboard.data import DashboardConfig, build_dashboard_data
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

import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import numpy as np
import torch

from interplab.errors import InterplabError

DEFAULT_MODEL = "smollm2-135m"
N_TOP_LOGITS = 10
MAX_CORRELATED_LATENTS = 16384
"""Latent-latent correlations need the d_sae² co-occurrence matrix (float32: 1 GiB at 16,384 latents); larger
dictionaries get no `corr_latents` (empty lists, meta "corr_latents": false)."""


@dataclass
class DashboardConfig:
    """Build a feature dashboard for one SAE: per-latent statistics over a corpus, written as a static site."""

    sae: str = ""
    """Folder of the SAE (SAELens or sparsify layout)."""
    model: str = ""
    """Model spec (default: the model the SAE was trained on, from its cfg.json, else smollm2-135m)."""
    hook: str = ""
    """Hook point the SAE reads (default: the SAE's hook_name)."""
    corpus: str = "python-docs"
    """Corpus spec (see `interplab harvest --help`)."""
    split: str = "train"
    """Corpus split: train, test or all."""
    tokens: int = 200_000
    """Tokens to read (rounded up to whole contexts)."""
    ctx_len: int = 128
    """Tokens per context."""
    batch_size: int = 32
    """Contexts per forward pass."""
    top_k: int = 20
    """Top-activating examples per latent (from distinct contexts)."""
    window: list[int] = field(default_factory=lambda: [12, 4])
    """Tokens shown before and after an example's token: before,after."""
    quantile_bins: int = 5
    """Activation intervals per latent, (0, 1/n], ..., ((n-1)/n, 1] times its max, each with sampled examples."""
    quantile_examples: int = 5
    """Random examples per activation interval."""
    chunk_size: int = 256
    """Latents per data file."""
    neurons: bool = True
    """Also correlate every latent with the MLP neurons of the SAE's layer (blocks.L.mlp.hook_post)."""
    out: str = "dashboard"
    """Site folder; the data goes to OUT/data/."""
    seed: int = 0
    """Seed of the corpus order and of the quantile samples."""
    device: str | None = None
    """Device to run on (default: cuda if available, else cpu)."""

    def validate(self) -> None:
        if not self.sae:
            raise InterplabError("--sae is required: the folder of a saved SAE")
        for name, minimum in (("tokens", 1), ("ctx_len", 2), ("batch_size", 1), ("top_k", 1),
                              ("quantile_bins", 1), ("quantile_examples", 1), ("chunk_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InterplabError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        w = self.window
        if len(w) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in w):
            raise InterplabError(f"--window must be two integers >= 0 (tokens before,after), got {w!r}")
        if self.split not in ("train", "test", "all"):
            raise InterplabError(f"--split {self.split!r} is not valid; valid: train, test, all")


# ---- inputs ---------------------------------------------------------------------------------------------------
def collect_contexts(cfg: DashboardConfig, tokenizer: Any) -> torch.Tensor:
    """The first ceil(tokens / ctx_len) contexts of the corpus, int32 [n_contexts, ctx_len] on the CPU."""
    from interplab.data import iter_contexts

    want = -(-cfg.tokens // cfg.ctx_len)
    out = []
    for ctx in iter_contexts(cfg.corpus, tokenizer, cfg.ctx_len, split=cfg.split, seed=cfg.seed):
        out.append(ctx)
        if len(out) == want:
            break
    if not out:
        raise InterplabError(f"corpus {cfg.corpus!r} ({cfg.split}) has no context of {cfg.ctx_len} tokens")
    return torch.stack(out).to(torch.int32)


def neuron_hook(model: Any, hook: str) -> str | None:
    """`blocks.L.mlp.hook_post` of the block holding `hook`, or None (no block, or no MLP)."""
    m = re.match(r"blocks\.(\d+)\.", hook)
    name = f"blocks.{m.group(1)}.mlp.hook_post" if m else None
    return name if name and model.info.d_mlp and name in model.hook_names else None


@torch.no_grad()
def read_batch(model: Any, sae: Any, hook: str, tokens: torch.Tensor,
               mlp_hook: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(SAE codes [batch, pos, d_sae], MLP neurons [batch, pos, d_mlp] or None) of a batch of contexts; the
    forward pass stops after the later of the two hooks."""
    names = [hook] + ([mlp_hook] if mlp_hook else [])
    cache = model.run_with_cache(tokens.to(model.device, torch.long), names).cache
    codes = sae.encode(cache[hook].to(sae.W_enc.dtype))
    return codes, (cache[mlp_hook] if mlp_hook else None)


def logit_directions(model: Any, sae: Any, hook: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(what each latent adds to the residual stream [d_sae, d_model], W_U [d_model, d_vocab]) or None.

    W_U is the unembedding with the final norm's scale folded in (`weights.extract.unembedding`), so W_dec W_U is
    the direct effect on the logits of a latent's decoder direction added to the final residual stream, up to the
    norm's positive per-token factor 1/rms (exact ranking). For LayerNorm models the norm also removes the mean
    over d_model, so the columns of W_U are centred: (d − mean(d)) · w = d · (w − mean(w)). Latents of an
    `mlp.hook_post` SAE write through the layer's W_out; other hooks whose width is not d_model get None.
    """
    from interplab.weights.extract import mlp_weights, normalize, unembedding

    W_dec = sae.W_dec.detach().float()
    d_model = model.info.d_model
    if hook.endswith("mlp.hook_post"):
        W_dec = W_dec @ mlp_weights(model, int(hook.split(".")[1]), fold_norm=False).W_out.to(W_dec)
    elif model.hook_dim(hook) != d_model or W_dec.shape[1] != d_model:
        return None
    W_U = unembedding(model)[0].to(W_dec)
    ones = torch.ones(1, d_model, device=W_U.device)
    if normalize(model, ones).abs().max() < 1e-3:  # only a centring norm maps the all-ones vector to 0
        W_U = W_U - W_U.mean(0, keepdim=True)
    return W_dec, W_U


def token_strings(tokenizer: Any, ids: np.ndarray) -> dict[int, str]:
    """Readable text of each token id (leading spaces kept): decoded alone, raw (never HTML-escaped)."""
    ids = sorted({int(i) for i in ids})
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    out = {}
    for i, text, piece in zip(ids, texts, pieces):
        # sentencepiece decoders drop the word-start marker of a lone token; put its space back
        if isinstance(piece, str) and piece.startswith("\u2581") and not text.startswith(" "):
            text = " " + text
        out[i] = text
    return out


# ---- the build ------------------------------------------------------------------------------------------------
def build_dashboard_data(cfg: DashboardConfig, *, model: Any = None, sae: Any = None) -> dict[str, Any]:
    """Run the pass, compute every latent's data and write `cfg.out`/data/; return a summary with timings."""
    from tqdm.auto import tqdm

    from interplab.dashboard import store
    from interplab.dashboard.stats import LatentStats, logit_effects
    from interplab.models.load import load_model
    from interplab.sae import load_sae

    if sae is not None and not cfg.sae:
        cfg = replace(cfg, sae="(in memory)")
    cfg.validate()
    t_start = time.perf_counter()
    sae = sae if sae is not None else load_sae(cfg.sae)
    spec = cfg.model or sae.cfg.model or DEFAULT_MODEL
    model = model if model is not None else load_model(spec, device=cfg.device)
    hook = cfg.hook or sae.cfg.hook_name
    if not hook:
        raise InterplabError(f"the SAE at {cfg.sae} names no hook (cfg.json hook_name); pass --hook")
    model.check_hook_names([hook])
    if model.hook_dim(hook) != sae.cfg.d_in:
        raise InterplabError(f"the SAE reads d_in={sae.cfg.d_in} but {hook} of {spec} has width "
                             f"{model.hook_dim(hook)}; pass the model and hook the SAE was trained on")
    if cfg.ctx_len > model.info.n_ctx:
        raise InterplabError(f"--ctx-len {cfg.ctx_len} exceeds the model's context length {model.info.n_ctx}")
    if model.tokenizer is None:
        raise InterplabError(f"{spec} has no tokenizer; the dashboard needs one to read a corpus")
    sae = sae.to(model.device).eval()
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
    from interplab.dashboard.assemble import assemble

    meta, index, chunks = assemble(cfg, stats, logits, contexts, model.tokenizer,
                                   info={"sae": cfg.sae, "model": spec, "hook": hook,
                                         "neuron_hook": mlp_hook})
    t_final = time.perf_counter()
    store.write_site_data(cfg.out, meta, index, chunks)
    t_end = time.perf_counter()
    return {"data": store.data_dir(cfg.out), "n_tokens": n_ctx * T, "n_contexts": n_ctx, "d_sae": sae.cfg.d_sae,
            "hook": hook, "model": spec, "config": asdict(cfg),
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
