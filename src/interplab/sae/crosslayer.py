"""`CrossLayerTranscoder` (CLT): one encoder per layer whose features write to that layer's and every later layer's
MLP output (Anthropic, "Circuit Tracing", 2025; circuit-tracer's `CrossLayerTranscoder`).

With L layers, F features per layer and width d:

    pre_i  = x_i @ W_enc[i] + b_enc[i]                  x_i = layer i's MLP input, W_enc[i] [d, F]
    f_i    = act(pre_i)                                 relu | jumprelu: pre·1[pre > θ_i] | topk: ReLU(TopK_k(pre))
    ŷ_j    = Σ_{i ≤ j} f_i @ W_dec[i][:, j − i] + b_dec[j]      W_dec[i] [F, L − i, d]; ŷ_j predicts MLP output j

The encoder reads x_i itself (no b_dec subtraction: there is one b_dec per *output* layer), as circuit-tracer does,
so its files (`circuit_tracer_files.py`) carry a CLT over bit for bit.

Training (`train_crosslayer`) reads every layer's MLP input and output in one forward pass per batch and minimises

    L = Σ_j mean_b ‖y_bj − ŷ_bj‖² + sparsity

with sparsity λ₁ · mean_b Σ_{i,f} f_bif ‖W_dec[i][f]‖ (relu; the decoder norm of feature f is that of its whole
decoder, all output layers concatenated), λ₀ · mean_b Σ_i L0(f_bi) through the straight-through estimator of
jumprelu.py (jumprelu), or nothing (topk: k fixes the sparsity). For jumprelu and topk each feature's concatenated
decoder is kept at unit norm (the gradient's component along the row removed before the step, the row renormalised
after it); relu leaves norms free, as the norm-weighted L1 makes the loss invariant to rescaling a feature.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from interplab.config import TextFields
from interplab.data.corpus import iter_contexts
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.sae.base import normalize_rows_, remove_parallel_component_
from interplab.sae.jumprelu import _JumpReLUWithL0

CLT_ACTIVATIONS = ("relu", "jumprelu", "topk")
"""The activations a cross-layer transcoder can use."""
IN_HOOK = "blocks.{layer}.mlp.hook_in"
OUT_HOOK = "blocks.{layer}.hook_mlp_out"


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
                      *, l1_coefficient: float, l0_coefficient: float, bandwidth: float) -> CLTLoss:
        """Σ_j mean_b ‖y_bj − ŷ_bj‖² plus the activation's sparsity term (module docstring)."""
        feats, l0 = [], torch.zeros((), device=self.device)
        for i, x in enumerate(self._check_inputs(inputs)):
            pre = self.pre_acts(i, x)
            if self.activation == "jumprelu":
                f, l0_tok = _JumpReLUWithL0.apply(pre, self.threshold[i], bandwidth)
                l0 = l0 + l0_tok.mean()
            else:
                f = self.activate(i, pre)
                l0 = l0 + (f > 0).sum(-1).float().mean()
            feats.append(f)
        recons = self.decode_all(feats)
        mse = sum(((r - y) ** 2).sum(-1).mean() for r, y in zip(recons, targets))
        if self.activation == "relu":
            norms = self.decoder_norms()
            sparsity = l1_coefficient * sum((f * n).sum(-1).mean() for f, n in zip(feats, norms))
        elif self.activation == "jumprelu":
            sparsity = l0_coefficient * l0
        else:
            sparsity = torch.zeros((), device=self.device)
        return CLTLoss(loss=mse + sparsity, mse=mse.detach(), sparsity=sparsity.detach(), l0=l0.detach())

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


class CLTLoss(NamedTuple):
    loss: Float[Tensor, ""]
    """What to backpropagate: mse + sparsity."""
    mse: Float[Tensor, ""]
    """Σ over output layers of the mean over tokens of the squared error summed over d_model."""
    sparsity: Float[Tensor, ""]
    """The L1 (relu) or L0 (jumprelu) term times its coefficient; 0 for topk."""
    l0: Float[Tensor, ""]
    """Active features per token, summed over the source layers."""


@dataclass
class CLTConfig(TextFields):
    """What `train_crosslayer` trains: the CLT's shape and sparsity, the optimiser and how many tokens."""

    d_sae: int = 1024
    """Features per layer."""
    activation: str = "topk"
    """relu (L1 penalty weighted by decoder norms), jumprelu (L0 penalty) or topk (k features per layer)."""
    k: int = 16
    """topk: active features per token at each layer."""
    l1_coefficient: float = 1e-3
    """relu: weight of mean_b Σ f·‖W_dec‖."""
    l0_coefficient: float = 1e-3
    """jumprelu: weight of the mean number of active features per token (summed over layers)."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the straight-through estimator's rectangle kernel."""
    jumprelu_init_threshold: float = 0.01
    """jumprelu: initial threshold of every feature."""
    lr: float = 1e-3
    """AdamW learning rate (no weight decay)."""
    n_tokens: int = 200_000
    """Training tokens (stops earlier if the corpus ends)."""
    drop_bos: bool = True
    """Leave out each context's first position (BOS activations are outliers that no sparse code should fit)."""
    in_hook: str = IN_HOOK
    """Template of the hook each encoder reads."""
    out_hook: str = OUT_HOOK
    """Template of the hook each layer's decoders predict."""

    def validate(self) -> None:
        """An InterplabError naming the first invalid field."""
        if self.activation not in CLT_ACTIVATIONS:
            raise InterplabError(f"unknown CLT activation {self.activation!r}; valid: {', '.join(CLT_ACTIVATIONS)}")
        for name in ("d_sae", "n_tokens", "batch_size", "ctx_len"):
            if getattr(self, name) < 1:
                raise InterplabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.drop_bos and self.ctx_len < 2:
            raise InterplabError("drop_bos needs ctx_len >= 2")
        for name in ("l1_coefficient", "l0_coefficient"):
            if getattr(self, name) < 0:
                raise InterplabError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                raise InterplabError(f"{name} must be > 0, got {getattr(self, name)}")


def train_crosslayer(model: HookedModel, cfg: CLTConfig, progress: bool = True, *,
                     batches: Iterable[Int[Tensor, "batch pos"]] | None = None) -> CrossLayerTranscoder:
    """Train a CLT on the fly: each batch of contexts runs the model once, reading every layer's `cfg.in_hook` and
    `cfg.out_hook`, and takes one AdamW step on the loss of the module docstring. `batches` replaces the corpus of
    `cfg` (token batches [batch, pos]). A plain loop: no checkpoints/resume, sweeps or torchrun."""
    cfg.validate()
    L, d = model.info.n_layers, model.info.d_model
    ins = [cfg.in_hook.format(layer=layer) for layer in range(L)]
    outs = [cfg.out_hook.format(layer=layer) for layer in range(L)]
    model.check_hook_names(ins + outs)
    clt = CrossLayerTranscoder(L, d, cfg.d_sae, activation=cfg.activation, k=cfg.k, in_hook=cfg.in_hook,
                               out_hook=cfg.out_hook, init_threshold=cfg.jumprelu_init_threshold,
                               seed=cfg.seed).to(model.device)
    opt = torch.optim.AdamW(clt.parameters(), lr=cfg.lr, weight_decay=0.0)
    source = batches if batches is not None else _context_batches(model, cfg)
    bar = tqdm(total=cfg.n_tokens, unit="tok", disable=not progress, desc="CLT")
    seen = 0
    for step, tokens in enumerate(source):
        cache = model.run_with_cache(tokens, ins + outs).cache
        start = 1 if cfg.drop_bos else 0
        xs = [cache[name][:, start:].flatten(0, 1).float() for name in ins]       # L × [tokens d]
        ys = [cache[name][:, start:].flatten(0, 1).float() for name in outs]
        if step == 0:  # the mean output of each layer: the best constant prediction
            with torch.no_grad():
                clt.b_dec.copy_(torch.stack([y.mean(0) for y in ys]))
        out = clt.training_loss(xs, ys, l1_coefficient=cfg.l1_coefficient, l0_coefficient=cfg.l0_coefficient,
                                bandwidth=cfg.jumprelu_bandwidth)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        clt.before_optimizer_step()
        opt.step()
        clt.after_optimizer_step()
        seen += xs[0].shape[0]
        bar.update(xs[0].shape[0])
        bar.set_postfix(mse=f"{out.mse.item():.4g}", l0=f"{out.l0.item():.1f}")
        if seen >= cfg.n_tokens:
            break
    bar.close()
    if seen == 0:
        raise InterplabError("train_crosslayer got no tokens: the corpus (or `batches`) is empty")
    return clt.eval()


def _context_batches(model: HookedModel, cfg: CLTConfig) -> Iterator[Int[Tensor, "batch pos"]]:
    """Batches of `cfg.batch_size` packed contexts of `cfg.corpus`'s split."""
    if model.tokenizer is None:
        raise InterplabError(f"model {model.info.spec} has no tokenizer: pass token batches to train_crosslayer")
    contexts = iter_contexts(cfg.corpus, model.tokenizer, cfg.ctx_len, split=cfg.split, seed=cfg.seed,
                             test_fraction=cfg.test_fraction)
    while batch := list(itertools.islice(contexts, cfg.batch_size)):
        yield torch.stack(batch)
