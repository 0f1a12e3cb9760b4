"""Streaming per-latent statistics for the dashboard: one pass over a corpus, memory bounded independently of it.

`LatentStats.update` takes the dense SAE codes f of one batch of contexts [batch, pos, d_sae] (and optionally the
MLP neurons of the same layer) and turns them into the sparse list of active entries (token t, latent i, value
v > 0) once; every statistic below is then a scatter over those entries, never a loop over tokens or latents:

- counts, Σv, Σv² per latent (frequency, mean over firing tokens, standard deviation over all tokens);
- an activation histogram per latent over fixed, shared, log-spaced edges. The edges are chosen from the first
  batch: hi = 4 × its largest activation, lo = hi · 1e-4, `HIST_BINS` bins of equal log-width. Activations below lo
  are counted in the first bin and above hi in the last (the end bins are open), so every firing is counted once;
- the top-k contexts per latent, distinct by construction: each batch first reduces every (latent, context) pair
  to its maximum (at the earliest position that reaches it), then merges those with the kept top-k;
- random samples for the quantile bins. A latent's bins, (0, 0.2], ..., (0.8, 1] × max_act, are only known at the
  end, so each firing gets a uniform random priority and every (latent, histogram bin) keeps the `n_samples`
  firings of smallest priority (a bottom-k sample, i.e. a uniform sample without replacement of that bin's
  firings). At the end the kept firings are regrouped by the latent's quantile bins and each bin takes its
  smallest priorities again. For histogram bins wholly inside a quantile bin this is exactly a uniform sample of
  the quantile bin's firings; the one histogram bin straddling each quantile edge (bins are 21 % wide) contributes
  only the firings it kept, a slight under-representation of that edge;
- the activations of the window around every kept firing, gathered from the batch when the firing enters a
  top-k or sample slot (and carried along while it stays), so nothing needs a second forward pass at the end;
- Pearson correlations between latents from the co-occurrence sums Σ_t f_i f_j, accumulated over the pairs of
  latents active on the same token (k² / 2 per token for a TopK SAE, an index_add into the d_sae² matrix, never a
  dense d_sae² product per batch);
- Pearson correlations with the layer's MLP neurons from Σ_t f_i h_n (a sparse × dense product).

With n tokens, mean μ_i = Σf_i / n and σ_i² = Σf_i² / n − μ_i², r_ij = (Σ f_i f_j / n − μ_i μ_j) / (σ_i σ_j): the
population correlation over every token read, zeros included (np.corrcoef of the dense codes). Counts and
first/second moments are accumulated in float64; the d_sae² co-occurrence sums in float32 (float64 would double
the largest allocation), the neuron sums in float32.

Memory per latent, whatever the number of tokens: top-k K·(W + 2) numbers (W = window length), samples
HIST_BINS · n_samples · (W + 3) numbers (≈ 20 KB with the defaults), d_sae co-occurrence sums, d_mlp neuron sums:
≈ 0.7 GB for 9,216 latents.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

HIST_BINS = 48
"""Activation histogram bins (log-spaced over 4 decades, each bin 10^(4/48) ≈ 1.21 × wider than the last)."""
HIST_DECADES = 4.0
PAIR_CHUNK = 1 << 22
"""Latent pairs per index_add: bounds the temporary memory of SAEs with many active latents per token."""


def hist_edges_for(max_act: float) -> Tensor:
    """The shared log-spaced histogram edges for a first batch whose largest activation is `max_act`."""
    hi = 4.0 * max_act if max_act > 0 else 1.0
    return torch.logspace(math.log10(hi) - HIST_DECADES, math.log10(hi), HIST_BINS + 1, dtype=torch.float64)


def window_acts(
    flat: Float[Tensor, "n d_sae"], tok: Tensor, lat: Tensor, ctx_len: int, before: int, after: int
) -> Float[Tensor, "m window"]:
    """Activations of latent lat[j] on tokens tok[j]-before .. tok[j]+after (rows of `flat`, contexts of ctx_len
    rows each); NaN where the window leaves tok[j]'s context."""
    offsets = torch.arange(-before, after + 1, device=flat.device)
    pos = tok % ctx_len
    p = pos[:, None] + offsets                                   # [m window]
    inside = (p >= 0) & (p < ctx_len)
    rows = (tok - pos)[:, None] + p.clamp(0, ctx_len - 1)
    return flat[rows, lat[:, None]].float().masked_fill(~inside, float("nan"))


class LatentStats:
    """The running statistics of every latent of one SAE (see the module docstring)."""

    def __init__(self, d_sae: int, *, top_k: int, window: tuple[int, int], n_samples: int, d_mlp: int | None,
                 correlate: bool, active_per_token: int | None, device: torch.device | str, seed: int = 0):
        dev = torch.device(device)
        self.d_sae, self.top_k, self.window, self.n_samples = d_sae, top_k, window, n_samples
        self.active_per_token = active_per_token
        w = window[0] + window[1] + 1
        self.n_tokens = 0
        self.hist_edges: Tensor | None = None
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=dev)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.sumsq = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.hist = torch.zeros(d_sae, HIST_BINS, dtype=torch.int64, device=dev)
        self.top_val = torch.full((d_sae, top_k), -math.inf, device=dev)
        self.top_tok = torch.full((d_sae, top_k), -1, dtype=torch.int64, device=dev)
        self.top_win = torch.full((d_sae, top_k, w), math.nan, device=dev)
        slots = d_sae * HIST_BINS
        self.smp_key = torch.full((slots, n_samples), math.inf, device=dev)
        self.smp_val = torch.zeros((slots, n_samples), device=dev)
        self.smp_tok = torch.full((slots, n_samples), -1, dtype=torch.int64, device=dev)
        self.smp_win = torch.full((slots, n_samples, w), math.nan, device=dev)
        self.pairs = torch.zeros(d_sae * d_sae, device=dev) if correlate else None
        self.lat_neuron = torch.zeros(d_sae, d_mlp, device=dev) if d_mlp else None
        self.h_sum = torch.zeros(d_mlp, dtype=torch.float64, device=dev) if d_mlp else None
        self.h_sumsq = torch.zeros(d_mlp, dtype=torch.float64, device=dev) if d_mlp else None
        self.gen = torch.Generator(device=dev).manual_seed(seed)

    # ---- one batch ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, f: Float[Tensor, "batch pos d_sae"], first_token: int,
               neurons: Float[Tensor, "batch pos d_mlp"] | None = None) -> None:
        """Add a batch of whole contexts whose first token has global index `first_token` (= context · ctx_len)."""
        B, T, d = f.shape
        flat = f.reshape(B * T, d)
        if self.hist_edges is None:
            self.hist_edges = hist_edges_for(float(flat.max())).to(f.device)
        m = self.active_per_token or int(torch.count_nonzero(flat, dim=1).max())
        m = max(1, min(m, d))
        vals, lats = flat.topk(m, dim=1, sorted=False)              # [N m]; zeros pad tokens with fewer active
        active = vals > 0
        tok = torch.arange(B * T, device=f.device)[:, None].expand_as(lats)[active]
        lat, val = lats[active], vals[active].float()
        self.n_tokens += B * T
        self.count += torch.bincount(lat, minlength=d)
        self.sum.index_add_(0, lat, val.double())
        self.sumsq.index_add_(0, lat, val.double().square())
        hbin = torch.bucketize(val, self.hist_edges[1:-1].float(), right=True)
        slot = lat * HIST_BINS + hbin
        self.hist.view(-1).add_(torch.bincount(slot, minlength=d * HIST_BINS))
        self._update_top(flat, tok, lat, val, B, T, first_token)
        self._update_samples(flat, tok, lat, val, slot, T, first_token)
        if self.pairs is not None:
            self._update_pairs(vals, lats)
        if neurons is not None and self.lat_neuron is not None:
            h = neurons.reshape(B * T, -1).float()
            codes = torch.sparse_coo_tensor(torch.stack([lat, tok]), val, (d, B * T), check_invariants=False)
            self.lat_neuron += torch.sparse.mm(codes, h)
            self.h_sum += h.sum(0).double()
            self.h_sumsq += h.double().square().sum(0)

    def _update_top(self, flat: Tensor, tok: Tensor, lat: Tensor, val: Tensor, B: int, T: int,
                    first_token: int) -> None:
        d, K = self.d_sae, self.top_k
        key = lat * B + tok // T                                     # (latent, context of the batch)
        best = torch.full((d * B,), -math.inf, device=val.device).scatter_reduce(0, key, val, "amax")
        at_best = val == best[key]
        best_tok = torch.full((d * B,), B * T, device=val.device).scatter_reduce(
            0, key[at_best], tok[at_best], "amin")                   # the earliest position reaching the maximum
        merged_val = torch.cat([self.top_val, best.view(d, B)], 1)
        new_val, pick = merged_val.topk(K, dim=1)                    # [d K]
        fresh = pick >= K
        rows = torch.arange(d, device=val.device)[:, None].expand_as(pick)
        new_tok = torch.where(fresh, 0, self.top_tok.gather(1, pick.clamp(max=K - 1)))
        new_win = self.top_win[rows, pick.clamp(max=K - 1)]
        r, c = rows[fresh], pick[fresh] - K
        local = best_tok.view(d, B)[r, c]
        ok = local < B * T                                           # a context where the latent never fired
        local = torch.where(ok, local, 0)
        new_tok[fresh] = torch.where(ok, local + first_token, -1)
        new_win[fresh] = window_acts(flat, local, r, T, *self.window)
        self.top_val, self.top_tok, self.top_win = new_val, new_tok, new_win

    def _update_samples(self, flat: Tensor, tok: Tensor, lat: Tensor, val: Tensor, slot: Tensor, T: int,
                        first_token: int) -> None:
        m = self.n_samples
        prio = torch.rand(val.shape, generator=self.gen, device=val.device)
        keep = prio < self.smp_key[slot, m - 1]                      # rows stay sorted: column m-1 is the largest
        prio, tok, lat, val, slot = prio[keep], tok[keep], lat[keep], val[keep], slot[keep]
        if slot.numel() == 0:
            return
        win = window_acts(flat, tok, lat, T, *self.window)
        touched = torch.unique(slot)
        all_slot = torch.cat([touched.repeat_interleave(m), slot])
        all_key = torch.cat([self.smp_key[touched].flatten(), prio])
        all_val = torch.cat([self.smp_val[touched].flatten(), val])
        all_tok = torch.cat([self.smp_tok[touched].flatten(), tok + first_token])
        all_win = torch.cat([self.smp_win[touched].flatten(0, 1), win])
        order = torch.argsort(all_key, stable=True)
        order = order[torch.argsort(all_slot[order], stable=True)]  # by slot, then by priority
        s = all_slot[order]
        rank = torch.arange(s.numel(), device=s.device) - torch.searchsorted(s, s)
        sel = rank < m
        o, s, rank = order[sel], s[sel], rank[sel]
        self.smp_key[s, rank] = all_key[o]
        self.smp_val[s, rank] = all_val[o]
        self.smp_tok[s, rank] = all_tok[o]
        self.smp_win[s, rank] = all_win[o]

    def _update_pairs(self, vals: Tensor, lats: Tensor) -> None:
        """Σ_t f_i f_j for i < j over the latents active on each token (the upper triangle of the d_sae² matrix)."""
        lats, order = lats.sort(dim=1)
        vals = vals.gather(1, order).float()
        ia, ib = torch.triu_indices(lats.shape[1], lats.shape[1], 1, device=lats.device)
        step = max(1, PAIR_CHUNK // max(1, ia.numel()))
        for start in range(0, lats.shape[0], step):
            li, vi = lats[start:start + step], vals[start:start + step]
            self.pairs.index_add_(0, (li[:, ia] * self.d_sae + li[:, ib]).flatten(),
                                  (vi[:, ia] * vi[:, ib]).flatten())

    # ---- results ------------------------------------------------------------------------------------------
    def moments(self) -> tuple[Tensor, Tensor]:
        """(μ, σ) of every latent over all tokens read, zeros included (float64)."""
        n = max(self.n_tokens, 1)
        mu = self.sum / n
        return mu, (self.sumsq / n - mu.square()).clamp_min(0).sqrt()

    @torch.no_grad()
    def latent_correlations(self, n_top: int, rows_per_step: int = 1024) -> tuple[Tensor, Tensor]:
        """(ids, r) [d_sae, n_top] of the other latents most correlated with each; r is NaN where undefined."""
        d, n = self.d_sae, max(self.n_tokens, 1)
        mu, sd = (t.float() for t in self.moments())
        P = self.pairs.view(d, d)
        ids, rs = [], []
        for i0 in range(0, d, rows_per_step):
            i1 = min(d, i0 + rows_per_step)
            co = P[i0:i1] + P[:, i0:i1].T                            # the upper triangle, mirrored
            r = (co / n - mu[i0:i1, None] * mu[None]) / (sd[i0:i1, None] * sd[None])
            r[torch.arange(i1 - i0), torch.arange(i0, i1)] = -math.inf  # not itself
            top_r, top_i = r.nan_to_num(nan=-math.inf).topk(min(n_top, d - 1), dim=1)
            ids.append(top_i)
            rs.append(top_r.masked_fill(~torch.isfinite(top_r), math.nan))
        return torch.cat(ids), torch.cat(rs)

    @torch.no_grad()
    def neuron_correlations(self, n_top: int) -> tuple[Tensor, Tensor]:
        """(neuron ids, r) [d_sae, n_top] of the MLP neurons most correlated with each latent (NaN: undefined)."""
        n = max(self.n_tokens, 1)
        mu, sd = (t.float() for t in self.moments())
        nu = (self.h_sum / n).float()
        tau = (self.h_sumsq / n - (self.h_sum / n).square()).clamp_min(0).sqrt().float()
        r = (self.lat_neuron / n - mu[:, None] * nu[None]) / (sd[:, None] * tau[None])
        top_r, top_i = r.nan_to_num(nan=-math.inf, posinf=-math.inf).topk(min(n_top, r.shape[1]), dim=1)
        return top_i, top_r.masked_fill(~torch.isfinite(top_r), math.nan)


LOGIT_BINS = 40
"""Bins of the logit-effect histogram (linear, symmetric around 0, shared by all latents)."""


@torch.no_grad()
def logit_effects(
    W_dec: Float[Tensor, "d_sae d_model"], W_U: Float[Tensor, "d_model d_vocab"], n_top: int = 10,
    n_bins: int = LOGIT_BINS, rows_per_step: int = 256,
) -> dict[str, Tensor]:
    """Top/bottom entries and histogram of each row of W_dec @ W_U, `rows_per_step` latents at a time.

    The d_sae × d_vocab product is never held whole. The histogram's shared edges are linear over [-R, R] with R =
    1.25 × the largest |effect| of the first step's latents (a random sample of the dictionary, as far as the
    order of latents goes); effects beyond ±R are counted in the end bins. Returns top_ids, top_vals, bot_ids,
    bot_vals [d_sae, n_top] (largest first, smallest first), hist [d_sae, n_bins], edges [n_bins + 1].
    """
    d_sae, d_vocab = W_dec.shape[0], W_U.shape[1]
    n_top = min(n_top, d_vocab)
    out: dict[str, list[Tensor]] = {"top_ids": [], "top_vals": [], "bot_ids": [], "bot_vals": [], "hist": []}
    edges = None
    for i0 in range(0, d_sae, rows_per_step):
        eff = W_dec[i0:i0 + rows_per_step].float() @ W_U.float()       # [rows d_vocab]
        if edges is None:
            R = 1.25 * float(eff.abs().max()) or 1.0
            edges = torch.linspace(-R, R, n_bins + 1, device=eff.device, dtype=torch.float64)
        tv, ti = eff.topk(n_top, dim=1)
        bv, bi = eff.topk(n_top, dim=1, largest=False)
        # linear bins: the index is arithmetic (a binary search over the edges costs twice as much); truncating
        # a value clamped to [0, n_bins - 0.5] is its floor
        b = eff.add_(R).mul_(n_bins / (2 * R)).clamp_(0, n_bins - 0.5).to(torch.int32)   # [rows d_vocab]
        b += torch.arange(0, eff.shape[0] * n_bins, n_bins, device=eff.device, dtype=torch.int32)[:, None]
        hist = torch.bincount(b.flatten(), minlength=eff.shape[0] * n_bins)
        for name, t in (("top_ids", ti), ("top_vals", tv), ("bot_ids", bi), ("bot_vals", bv),
                        ("hist", hist.view(-1, n_bins))):
            out[name].append(t)
    result = {k: torch.cat(v) for k, v in out.items()}
    result["edges"] = edges
    return result
