"""`CrossLayerTranscoder` (CLT): one encoder per layer whose features write to that layer's and every later layer's
MLP output (Anthropic, "Circuit Tracing", 2025; circuit-tracer's `CrossLayerTranscoder`).

With L layers, F features per layer and width d:

    pre_i  = x_i @ W_enc[i] + b_enc[i]                  x_i = layer i's MLP input, W_enc[i] [d, F]
    f_i    = act(pre_i)                                 relu | jumprelu: pre·1[pre > θ_i] | topk: ReLU(TopK_k(pre))
    ŷ_j    = Σ_{i ≤ j} f_i @ W_dec[i][:, j − i] + b_dec[j]      W_dec[i] [F, L − i, d]; ŷ_j predicts MLP output j

The encoder reads x_i itself (no b_dec subtraction: there is one b_dec per *output* layer), as circuit-tracer does,
so its files (`circuit_tracer_files.py`) carry a CLT over bit for bit.

The training loss (`training_loss`; the run around it is `crosslayer_train.train_clt`, `interplab transcoder
train`) is

    L = Σ_j mean_b ‖y_bj − ŷ_bj‖² + sparsity (+ α·AuxK for topk)

with sparsity λ₁ · mean_b Σ_{i,f} f_bif ‖W_dec[i][f]‖ (relu; the decoder norm of feature f is that of its whole
decoder, all output layers concatenated), λ₀ · mean_b Σ_i L0(f_bi) through the straight-through estimator of
jumprelu.py (jumprelu), or nothing (topk: k fixes the sparsity). For jumprelu and topk each feature's concatenated
decoder is kept at unit norm (the gradient's component along the row removed before the step, the row renormalised
after it); relu leaves norms free, as the norm-weighted L1 makes the loss invariant to rescaling a feature.

TopK trains through the sparse kernels of kernels.py, as sae/topk.py does: the encoder forward is the one dense
product (no grad, selection.py); the decoder of layer i, all its L − i output layers at once, and both backward
passes touch only the batch·k chosen (token, feature) pairs. AuxK (Gao et al. 2024) lets dead features learn: at
each layer i the top aux_k pre-activations among i's dead features reconstruct, with their whole decoders and no
bias, the detached residual [y_j − ŷ_j]_{j ≥ i} of the outputs they reach: AuxK = Σ_i mean_b ‖e_bi − ê_bi‖².

Normalisation (`fold_scales`): a CLT trained on x̃_i = s_i x_i towards ỹ_j = t_j y_j equals, on raw activations,
the CLT with W_enc[i] ← s_i W_enc[i] (same pre-activations, so the same features and thresholds),
W_dec[i][:, j − i] ← W_dec[i][:, j − i] / t_j and b_dec[j] ← b_dec[j] / t_j.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from interplab.errors import InterplabError
from interplab.sae.base import normalize_rows_, remove_parallel_component_
from interplab.sae.crosslayer_config import CLT_ACTIVATIONS, IN_HOOK, OUT_HOOK
from interplab.sae.jumprelu import _JumpReLUWithL0
from interplab.sae.kernels import dense_subset_encode, sparse_decode, sparse_encode
from interplab.sae.selection import DenseAux, Selection, encode_select

__all__ = ["CLT_ACTIVATIONS", "IN_HOOK", "OUT_HOOK", "CLTLoss", "CrossLayerTranscoder"]


class CrossLayerTranscoder(nn.Module):
    """Per-layer encoders; each layer's features decode into that layer's and every later layer's MLP output."""

    def __init__(self, n_layers: int, d_model: int, d_sae: int, *, activation: str = "relu", k: int = 32,
                 init_threshold: float = 0.01, in_hook: str = IN_HOOK, out_hook: str = OUT_HOOK, seed: int = 0):
        super().__init__()
        for name, value in (("n_layers", n_layers), ("d_model", d_model), ("d_sae", d_sae)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}")
        if activation not in CLT_ACTIVATIONS:
            raise InterplabError(f"unknown CLT activation {activation!r}; valid: {', '.join(CLT_ACTIVATIONS)}")
        if activation == "topk" and not 1 <= k < d_sae:
            raise InterplabError(f"topk needs 1 <= k < d_sae={d_sae}, got k={k}")
        if activation == "jumprelu" and not init_threshold > 0:
            raise InterplabError(f"jumprelu needs init_threshold > 0, got {init_threshold}")
        for name, template in (("in_hook", in_hook), ("out_hook", out_hook)):
            if "{layer}" not in template:
                raise InterplabError(f"{name} must be a template with {{layer}}, e.g. {IN_HOOK!r}; got {template!r}")
        self.n_layers, self.d_model, self.d_sae = n_layers, d_model, d_sae
        self.activation, self.k = activation, k
        self.in_hook, self.out_hook = in_hook, out_hook
        self.W_enc = nn.Parameter(torch.empty(n_layers, d_model, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_sae))
        self.W_dec = nn.ParameterList(nn.Parameter(torch.empty(d_sae, n_layers - i, d_model))
                                      for i in range(n_layers))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model))
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.full((n_layers, d_sae), float(init_threshold)))
        else:
            self.register_parameter("threshold", None)
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """W_enc ~ N(0, 1/d) (pre-activations of order ‖x‖/√d), decoder rows random directions of norm 1 (0.1 for
        relu, whose features all start half active), from a seeded generator."""
        g = torch.Generator().manual_seed(seed)
        self.W_enc.copy_(torch.randn(self.W_enc.shape, generator=g) / self.d_model ** 0.5)
        scale = 0.1 if self.activation == "relu" else 1.0
        for W in self.W_dec:
            rows = torch.randn(W.shape, generator=g).flatten(1)
            W.copy_((rows / rows.norm(dim=1, keepdim=True) * scale).view_as(W))

    # ---- the forward pass ---------------------------------------------------------------------------------
    def in_hook_at(self, layer: int) -> str:
        """The hook layer `layer`'s encoder reads, e.g. `blocks.3.mlp.hook_in`."""
        return self.in_hook.format(layer=layer)

    def out_hook_at(self, layer: int) -> str:
        """The hook the decoders into layer `layer` write, e.g. `blocks.3.hook_mlp_out`."""
        return self.out_hook.format(layer=layer)

    def _check_layer(self, layer: int, what: str) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise InterplabError(f"{what} {layer!r} is not a layer of this CLT (0..{self.n_layers - 1})")

    def pre_acts(self, layer: int, x_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """pre_i = x_i @ W_enc[i] + b_enc[i]."""
        self._check_layer(layer, "encoder layer")
        return x_in @ self.W_enc[layer] + self.b_enc[layer]

    def encode(self, layer: int, x_in: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Layer `layer`'s features f_i = act(pre_i) (inference semantics)."""
        return self.activate(layer, self.pre_acts(layer, x_in))

    def activate(self, layer: int, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """act(pre) of layer `layer`: ReLU, pre·1[pre > θ_layer], or ReLU of each row's k largest entries."""
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold[layer])
        values, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, values.relu())

    def decode_to(self, layer_out: int, feats: dict[int, Float[Tensor, "... d_sae"]]) -> Float[Tensor, "... d_model"]:
        """ŷ_j = Σ_i feats[i] @ W_dec[i][:, j − i] + b_dec[j] for j = `layer_out`; layers missing from `feats`
        contribute nothing. A feature of layer i can only write to layers j ≥ i."""
        self._check_layer(layer_out, "output layer")
        out = self.b_dec[layer_out]
        for layer, f in sorted(feats.items()):
            self._check_layer(layer, "feature layer")
            if layer > layer_out:
                raise InterplabError(f"features of layer {layer} cannot write to the earlier layer {layer_out}")
            out = out + f @ self.W_dec[layer][:, layer_out - layer]
        return out

    def forward(self, inputs: list[Float[Tensor, "... d_model"]]) -> list[Float[Tensor, "... d_model"]]:
        """Every layer's predicted MLP output from every layer's MLP input."""
        return self.decode_all([self.encode(i, x) for i, x in enumerate(self._check_inputs(inputs))])

    def decode_all(self, feats: list[Float[Tensor, "... d_sae"]]) -> list[Float[Tensor, "... d_model"]]:
        """[ŷ_0, ..., ŷ_{L−1}] from all layers' features: one product per source layer with its whole decoder."""
        outs = list(self.b_dec.unbind(0))
        for i, f in enumerate(feats):
            contrib = (f @ self.W_dec[i].flatten(1)).unflatten(-1, (self.n_layers - i, self.d_model))
            for j in range(i, self.n_layers):
                outs[j] = outs[j] + contrib[..., j - i, :]
        return outs

    def _check_inputs(self, inputs: list[Tensor]) -> list[Tensor]:
        if len(inputs) != self.n_layers:
            raise InterplabError(f"the CLT needs one input per layer ({self.n_layers}), got {len(inputs)}")
        for i, x in enumerate(inputs):
            if x.shape[-1] != self.d_model:
                raise InterplabError(f"input of layer {i} has width {x.shape[-1]}, the CLT reads {self.d_model}")
        return inputs

    def decoder_norms(self) -> Float[Tensor, "n_layers d_sae"]:
        """‖W_dec[i][f]‖ over all output layers of each feature, per source layer i."""
        return torch.stack([W.flatten(1).norm(dim=1) for W in self.W_dec])

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.activation == "topk" else ""
        return f"n_layers={self.n_layers}, d_model={self.d_model}, d_sae={self.d_sae}, activation={self.activation}{k}"

    # ---- training -----------------------------------------------------------------------------------------
    def training_loss(self, inputs: list[Float[Tensor, "batch d_model"]], targets: list[Float[Tensor, "batch d_model"]],
                      *, l1_coefficient: float = 0.0, l0_coefficient: float = 0.0, bandwidth: float = 0.05,
                      dead_mask: Bool[Tensor, "n_layers d_sae"] | None = None, aux_k: int = 0,
                      aux_coefficient: float = 0.0, sparse: bool = True) -> CLTLoss:
        """Σ_j mean_b ‖y_bj − ŷ_bj‖² plus the activation's sparsity term, plus α·AuxK over the features `dead_mask`
        marks (topk with aux_k > 0); see the module docstring. `sparse=False` trains topk through dense products
        (the reference the sparse kernels are checked and timed against)."""
        xs = self._check_inputs(inputs)
        if self.activation == "topk" and sparse:
            layers = [self._sparse_topk_layer(i, x, dead_mask, aux_k) for i, x in enumerate(xs)]
        else:
            layers = [self._dense_layer(i, x, bandwidth) for i, x in enumerate(xs)]
        recons = list(self.b_dec.unbind(0))
        for i, layer in enumerate(layers):
            for j in range(i, self.n_layers):
                recons[j] = recons[j] + layer.contrib[:, (j - i) * self.d_model:(j - i + 1) * self.d_model]
        errors = [y - r for y, r in zip(targets, recons)]
        se = torch.stack([e.pow(2).sum() for e in errors])                       # [n_layers], summed over rows
        mse = se.sum() / len(xs[0])
        sparsity = self._sparsity(layers, l1_coefficient, l0_coefficient)
        aux = self._aux_loss(xs, layers, errors) * aux_coefficient if aux_k and aux_coefficient else mse.new_zeros(())
        l0_layers = torch.stack([layer.l0.detach() for layer in layers])
        return CLTLoss(loss=mse + sparsity + aux, mse=mse.detach(), sparsity=sparsity.detach(), l0=l0_layers.sum(),
                       aux=aux.detach(), se=se.detach(), l0_layers=l0_layers,
                       fired=torch.stack([layer.fired for layer in layers]))

    def _dense_layer(self, i: int, x: Float[Tensor, "batch d_model"], bandwidth: float) -> _Layer:
        """Layer i through dense products: f_i = act(pre_i) and f_i @ W_dec[i] over all its output layers."""
        pre = self.pre_acts(i, x)
        if self.activation == "jumprelu":
            f, l0_tok = _JumpReLUWithL0.apply(pre, self.threshold[i], bandwidth)
            l0 = l0_tok.mean()
        else:
            f = self.activate(i, pre)
            l0 = (f > 0).sum(-1).to(f.dtype).mean()
        contrib = f @ self.W_dec[i].flatten(1)                                   # [batch (L − i)·d]
        return _Layer(contrib, l0, (f.detach() > 0).any(0), f, None)

    def _sparse_topk_layer(self, i: int, x: Float[Tensor, "batch d_model"],
                           dead_mask: Bool[Tensor, "n_layers d_sae"] | None, aux_k: int) -> _Layer:
        """Layer i of a topk CLT through the sparse kernels: a no-grad dense encoder pass picks each token's k
        features (and the AuxK candidates among dead ones); gradients reach only the chosen pairs."""
        dead = dead_mask[i].to(x.device) if dead_mask is not None and aux_k else None
        sel = encode_select(x, self.W_enc[i], self.b_enc[i], self.k, dead_mask=dead, aux_k=aux_k)
        f = sparse_encode(x, self.W_enc[i], self.b_enc[i], sel.codes, values=sel.values, x_in=x).relu()   # [nnz]
        contrib = sparse_decode(f, self.W_dec[i].flatten(1), sel.codes)                     # [batch (L − i)·d]
        active = f.detach() > 0
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired[sel.codes.cols[active]] = True
        return _Layer(contrib, active.sum().to(f.dtype) / len(x), fired, f, sel)

    def _sparsity(self, layers: list[_Layer], l1_coefficient: float, l0_coefficient: float) -> Float[Tensor, ""]:
        """relu: λ₁ · Σ_i mean_b Σ_f f·‖W_dec[i][f]‖; jumprelu: λ₀ · Σ_i mean_b L0 (straight-through); topk: 0."""
        if self.activation == "relu":
            return l1_coefficient * sum((layer.f * n).sum(-1).mean() for layer, n in zip(layers, self.decoder_norms()))
        if self.activation == "jumprelu":
            return l0_coefficient * sum(layer.l0 for layer in layers)
        return torch.zeros((), device=self.device)

    def _aux_loss(self, xs: list[Float[Tensor, "batch d_model"]], layers: list[_Layer],
                  errors: list[Float[Tensor, "batch d_model"]]) -> Float[Tensor, ""]:
        """Σ_i mean_b ‖e_bi − ê_bi‖²: e_i = the detached residuals of layers i..L−1 concatenated, ê_i their
        reconstruction by the top aux_k pre-activations (no ReLU, as sae/topk.py) of layer i's dead features."""
        total = torch.zeros((), device=self.device)
        for i, (x, layer) in enumerate(zip(xs, layers)):
            if layer.sel is None or layer.sel.aux is None:
                continue
            W = self.W_dec[i].flatten(1)                                          # [F (L − i)·d]
            if isinstance(layer.sel.aux, DenseAux):  # few dead features: a dense block over them
                dead, values, mask = layer.sel.aux
                z = dense_subset_encode(x, self.W_enc[i], self.b_enc[i], dead, values, mask)
                e_hat = z @ W.index_select(0, dead)
            else:
                codes, values = layer.sel.aux
                z = sparse_encode(x, self.W_enc[i], self.b_enc[i], codes, values=values, x_in=x)
                e_hat = sparse_decode(z, W, codes)
            e = torch.cat(errors[i:], dim=-1).detach()
            total = total + (e - e_hat).pow(2).sum(-1).mean()
        return total

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """jumprelu/topk: remove from each feature's decoder gradient its component along the (unit) decoder row."""
        if self.activation != "relu":
            for W in self.W_dec:
                if W.grad is not None:
                    remove_parallel_component_(W.grad.view(self.d_sae, -1), W.view(self.d_sae, -1))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """jumprelu/topk: renormalise each feature's concatenated decoder; jumprelu: keep thresholds ≥ 0."""
        if self.activation != "relu":
            for W in self.W_dec:
                normalize_rows_(W.view(self.d_sae, -1))
        if self.threshold is not None:
            self.threshold.clamp_min_(0.0)

    @torch.no_grad()
    def fold_scales(self, in_scales: list[float], out_scales: list[float]) -> None:
        """Make this CLT, trained on inputs x_i·s_i towards targets y_j·t_j, read and write raw activations
        (module docstring): W_enc[i] ·= s_i, W_dec[i][:, j − i] /= t_j, b_dec[j] /= t_j."""
        for i, s in enumerate(in_scales):
            self.W_enc[i].mul_(s)
        t = torch.tensor(out_scales, dtype=self.b_dec.dtype, device=self.device)
        self.b_dec.div_(t[:, None])
        for i, W in enumerate(self.W_dec):
            W.div_(t[i:, None])


class _Layer(NamedTuple):
    """One source layer's part of a training step."""

    contrib: Float[Tensor, "batch out"]
    """f_i @ W_dec[i] flattened over its L − i output layers (no bias)."""
    l0: Float[Tensor, ""]
    """Active features per token."""
    fired: Bool[Tensor, " d_sae"]
    """Which features fired on at least one token."""
    f: Float[Tensor, "..."]
    """The features: [batch, d_sae] dense, or [nnz] at the chosen pairs (sparse topk)."""
    sel: Selection | None
    """Sparse topk: the chosen pairs and AuxK candidates."""


class CLTLoss(NamedTuple):
    loss: Float[Tensor, ""]
    """What to backpropagate: mse + sparsity + α·AuxK."""
    mse: Float[Tensor, ""]
    """Σ over output layers of the mean over tokens of the squared error summed over d_model."""
    sparsity: Float[Tensor, ""]
    """The L1 (relu) or L0 (jumprelu) term times its coefficient; 0 for topk."""
    l0: Float[Tensor, ""]
    """Active features per token, summed over the source layers."""
    aux: Float[Tensor, ""]
    """α·AuxK (topk with dead features; else 0)."""
    se: Float[Tensor, " n_layers"]
    """Squared error of each output layer, summed over tokens and d_model."""
    l0_layers: Float[Tensor, " n_layers"]
    """Active features per token at each source layer."""
    fired: Bool[Tensor, "n_layers d_sae"]
    """Which features of each layer fired on at least one token."""
