"""Direct edge weights of an attribution graph, with one backward pass per batch of target nodes.

Nodes (circuit-tracer's order): active features (layer, position, latent), error nodes (layer-major: layer, then
position), token embeddings (one per position), and logit nodes (the top predictions at the last position). The
adjacency matrix A holds A[t, s], the direct effect of source s on target t in the linearised replacement model
(attention patterns and norm scales frozen, transcoder activations and errors held fixed):

    A[t, s] = v_s · J_{s→t} · u_t

where v_s is what the source writes (a_s · W_dec[s] into the MLP output for a feature, the error vector for an
error node, the embedding for a token), u_t what the target reads (W_enc[:, t] at the MLP input for a feature; the
logit's unembedding column minus the mean column at ln_final's output for a logit, so the logit is measured against
the mean logit, as circuit-tracer does), and J the Jacobian of the frozen model between the two points — which is a
constant, since the model is linear there. One forward pass of the frozen model with the embedding and every MLP
output as leaves, then one backward pass per batch of B targets with the B read vectors as batched cotangents
(`is_grads_batched`), gives each target's gradient at every MLP output and at the embedding; contracting those with
the v_s gives B rows of A. A feature of a cross-layer transcoder writes into several MLP outputs (layers i..L−1),
so its v_s is one vector per output layer and A[t, s] = Σ_{j ≥ i} v_{s,j} · J_{j→t} · u_t: the same gradients, dotted
with every decoder row and summed per feature, so a CLT costs no extra backward pass. A causal model's target at
position p depends on positions ≤ p only, so the targets are taken position by position, each on its prefix, and by
layer within a position (a batch of early-layer targets stops its backward pass early).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int

from interplab.graphs.replacement import Replacement, freeze_hooks, setup_replacement
from interplab.models.hooked import HookedModel
from interplab.models.hooks import HookFn, StopForward
from interplab.sae.mlp_dictionary import Dictionary, MLPDictionary, as_dictionary


class AttributionGraph(NamedTuple):
    """An unpruned attribution graph."""

    adjacency: Float[torch.Tensor, "n n"]
    """A[target, source]: direct effects, nodes ordered [features, errors (layer-major), tokens, logits]."""
    rep: Replacement
    """The nodes' features, errors and embeddings."""
    logit_ids: Int[torch.Tensor, " n_logits"]
    logit_probs: Float[torch.Tensor, " n_logits"]
    n_layers: int

    @property
    def n_pos(self) -> int:
        return int(self.rep.tokens.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.rep.feat_layer.shape[0])

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def token_slice(self) -> slice:
        start = self.error_slice.stop
        return slice(start, start + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        start = self.token_slice.stop
        return slice(start, start + int(self.logit_ids.shape[0]))


@torch.no_grad()
def salient_logits(logits: Float[torch.Tensor, " d_vocab"], max_n: int, prob: float
                   ) -> tuple[Int[torch.Tensor, " k"], Float[torch.Tensor, " k"]]:
    """The fewest top predictions whose probabilities sum to at least `prob`, at most `max_n` (circuit-tracer)."""
    probs = torch.softmax(logits.double(), -1)
    top_p, top_idx = probs.topk(min(max_n, probs.shape[0]))
    cut = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(prob, dtype=top_p.dtype))) + 1
    return top_idx[:cut], top_p[:cut]


def logit_vectors(model: HookedModel, ids: Int[torch.Tensor, " k"], dtype: torch.dtype
                  ) -> Float[torch.Tensor, "k d_model"]:
    """u_t = ∂(logit_t − mean logit)/∂(ln_final's output): the unembedding column minus the mean column. The map
    is affine, so the gradient at zero is exact."""
    x = torch.zeros(ids.shape[0], 1, model.info.d_model, device=model.device, dtype=dtype, requires_grad=True)
    with torch.enable_grad():
        logits = model._unembed(x)[:, 0]  # [k, d_vocab]
        picked = logits.gather(1, ids.to(logits.device)[:, None])[:, 0] - logits.mean(-1)
        (u,) = torch.autograd.grad(picked.sum(), x)
    return u[:, 0].detach()


def decoder_spans(rep: Replacement, n_layers: int) -> list[list[slice | None]]:
    """[layer][pos]: the slice of the decoder rows writing into that layer's MLP output at that position (rows are
    sorted by output layer, then position), or None if no feature writes there."""
    n_pos = int(rep.tokens.shape[1])
    spans: list[list[slice | None]] = [[None] * n_pos for _ in range(n_layers)]
    key = (rep.dec_layer * n_pos + rep.feat_pos[rep.dec_feature]).cpu()
    for value, start, count in zip(*_runs(key)):
        layer, pos = divmod(value, n_pos)
        spans[layer][pos] = slice(start, start + count)
    return spans


def _runs(key: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """Values, start indices and lengths of the runs of equal values in a sorted 1-d tensor."""
    values, counts = torch.unique_consecutive(key, return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=counts.dtype), counts.cumsum(0)[:-1]])
    return values.tolist(), starts.tolist(), counts.tolist()


class Linearised:
    """The replacement model linearised around the prompt's first `n_pos` positions (a causal model's targets at
    position p depend on positions ≤ p only, so each target position needs only its prefix): one forward pass,
    kept for repeated backward passes. The embedding and every MLP output are leaves (the MLP's own computation is
    cut off: its output is the real one, held fixed); patterns and scales carry no gradient; a skip transcoder's
    x_in @ W_skip stays differentiable, as it is linear. The backward passes are batched over targets with
    `is_grads_batched` (vmap over the cotangents), so the forward pass runs once, on one copy of the prompt."""

    def __init__(self, model: HookedModel, dic: MLPDictionary, rep: Replacement, n_pos: int):
        self.n_layers, self.n_pos, self.rep = model.info.n_layers, n_pos, rep
        self.mlp_in: dict[int, torch.Tensor] = {}
        self.leaves: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.spans = decoder_spans(rep, self.n_layers)
        self.embed = rep.embeddings[None, :n_pos].to(model.device).clone().requires_grad_(True)
        hooks: list[tuple[str, HookFn]] = [*freeze_hooks(model), ("hook_embed", lambda act, _n: self.embed.to(act))]
        for layer in range(self.n_layers):
            hooks += [(f"blocks.{layer}.mlp.hook_in", self._keep_in),
                      (f"blocks.{layer}.hook_mlp_out", lambda act, n, W=dic.skip(layer): self._leaf(act, n, W))]
        hooks.append(("ln_final.hook_out", self._keep_final))
        with torch.enable_grad():
            try:
                model.run_with_hooks(rep.tokens[:, :n_pos], hooks)
            except StopForward:
                pass

    def _keep_in(self, act: torch.Tensor, name: str) -> torch.Tensor:
        self.mlp_in[int(name.split(".")[1])] = act
        return act.detach()  # the MLP itself needs no autograd record: its output is replaced by a leaf

    def _leaf(self, act: torch.Tensor, name: str, W_skip: torch.Tensor | None) -> torch.Tensor:
        layer = int(name.split(".")[1])
        leaf = self.rep.mlp_out[layer][None, : self.n_pos].to(act).clone().requires_grad_(True)
        self.leaves[layer] = leaf
        if W_skip is None:
            return leaf
        skip = self.mlp_in[layer].to(W_skip) @ W_skip
        return leaf + (skip - skip.detach()).to(act)  # value unchanged, gradient through the linear skip

    def _keep_final(self, act: torch.Tensor, _name: str) -> None:
        self.final = act
        raise StopForward  # the logits are read through u_t: nothing after ln_final is needed

    def rows(self, layers: Int[torch.Tensor, " b"], reads: Float[torch.Tensor, "b d_model"]
             ) -> Float[torch.Tensor, "b n_sources"]:
        """Rows of A for b targets at the last position of the prefix: target i reads `reads[i]` at layer
        `layers[i]`'s MLP input (layer n_layers: ln_final's output). Columns: [features, errors, tokens]."""
        b = int(layers.shape[0])
        outputs, cotangents = [], []
        for layer in layers.unique().tolist():
            sel = (layers == layer).nonzero()[:, 0]
            x = self.final if layer == self.n_layers else self.mlp_in[layer]
            assert x is not None
            cot = x.new_zeros(b, *x.shape)  # [b, 1, n_pos, d]: target i's read vector in copy i
            cot[sel.to(x.device), 0, -1] = reads[sel].to(x)
            outputs.append(x), cotangents.append(cot)
        inputs = [self.embed] + [self.leaves[l] for l in range(int(layers.max()))]
        grads = torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
        return self._contract([None if g is None else g[:, 0] for g in grads], b)

    def _contract(self, grads: list[torch.Tensor | None], b: int) -> Float[torch.Tensor, "b n_sources"]:
        """Dot each target's gradients with what every source (at a position of the prefix) writes; a feature's
        edge sums its decoder rows' dots over the output layers it writes into."""
        rep, n_pos = self.rep, self.n_pos
        full_pos, dtype = rep.tokens.shape[1], rep.decoder_vecs.dtype
        feat = torch.zeros(b, rep.feat_layer.shape[0], dtype=dtype, device=rep.decoder_vecs.device)
        err = torch.zeros(b, self.n_layers, full_pos, dtype=dtype, device=feat.device)
        tok = feat.new_zeros(b, full_pos)
        for layer, g in enumerate(grads[1:]):
            if g is None:
                continue
            g = g.to(feat)  # [b, n_pos, d]
            for pos in range(n_pos):  # each decoder row against the gradient at its own position only
                span = self.spans[layer][pos]
                if span is not None:
                    feat.index_add_(1, rep.dec_feature[span], g[:, pos] @ rep.decoder_vecs[span].T)
            err[:, layer, :n_pos] = (g * rep.errors[layer, :n_pos]).sum(-1)
        if grads[0] is not None:
            tok[:, :n_pos] = (grads[0].to(feat) * rep.embeddings[:n_pos]).sum(-1)
        return torch.cat([feat, err.flatten(1), tok], 1)


def attribute(model: HookedModel, transcoders: Dictionary, tokens: Int[torch.Tensor, "1 pos"], *,
              max_logits: int = 10, logit_prob: float = 0.95, batch_size: int = 256,
              zero_bos: bool = True) -> AttributionGraph:
    """The full (unpruned) attribution graph of the prompt's next-token prediction, through per-layer transcoders
    or a cross-layer transcoder."""
    dic = as_dictionary(transcoders)
    rep = setup_replacement(model, dic, tokens, zero_bos=zero_bos)
    logit_ids, logit_probs = salient_logits(rep.logits, max_logits, logit_prob)
    n_feat, n_layers, n_pos = rep.feat_layer.shape[0], model.info.n_layers, rep.tokens.shape[1]
    n_logits = logit_ids.shape[0]
    n_src = n_feat + (n_layers + 1) * n_pos
    n = n_src + n_logits
    # targets by position (each needs only its prefix), and by layer within a position, so that the backward
    # pass of a batch of early-layer targets stops early; the logits read the last position after every layer
    t_layers = torch.cat([rep.feat_layer.cpu(), torch.full((n_logits,), n_layers)])
    t_pos = torch.cat([rep.feat_pos.cpu(), torch.full((n_logits,), n_pos - 1)])
    reads = torch.cat([rep.encoder_rows, logit_vectors(model, logit_ids, rep.logits.dtype).to(rep.encoder_rows)])
    t_rows = torch.cat([torch.arange(n_feat), torch.arange(n_src, n)])
    adjacency = torch.zeros(n, n, dtype=rep.decoder_vecs.dtype)
    for pos in t_pos.unique().tolist():
        at = (t_pos == pos).nonzero()[:, 0]
        at = at[t_layers[at].argsort(stable=True)]
        lin = Linearised(model, dic, rep, pos + 1)
        for start in range(0, at.shape[0], batch_size):
            chunk = at[start:start + batch_size]
            adjacency[t_rows[chunk], :n_src] = lin.rows(t_layers[chunk], reads[chunk.to(reads.device)]).detach().cpu()
    return AttributionGraph(adjacency, rep, logit_ids.cpu(), logit_probs.cpu().to(adjacency.dtype), n_layers)
