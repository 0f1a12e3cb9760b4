"""The in-house toy transformer: a small GPT written plainly, with the same hook names as every other model.

Weights use the TransformerLens layout (`x @ W`): W_Q/W_K/W_V [head, d_model, d_head], W_O [head, d_head, d_model],
W_in [d_model, d_mlp], W_out [d_mlp, d_model], W_E [d_vocab, d_model], W_pos [n_ctx, d_model], W_U [d_model, d_vocab].
Saved as `config.json` (the marker `load_model` recognises, the `ToyConfig`, and any extra keys of whoever built the
model) + `model.safetensors` (the state dict).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save
from torch import nn

from interplab.errors import InterplabError
from interplab.fileio import write_url_atomic
from interplab.models.hooked import HookedModel, ModelInfo
from interplab.models.hooks import (
    ActFn,
    Handle,
    hook_module_output,
    hook_names_for,
    norm_scale,
    normalize_with_scale,
    split_norm,
)
from interplab.models.tokens import ByteTokenizer
from interplab.runs import JSONDict

TOY_MARKER = "interplab.toy_transformer"
ACTIVATIONS = {"gelu": nn.functional.gelu, "relu": torch.relu, "silu": nn.functional.silu}


@dataclass
class ToyConfig:
    """Shape and initialisation of a toy transformer."""

    n_layers: int = 2
    """Number of transformer blocks."""
    d_model: int = 64
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads per block."""
    d_head: int = 16
    """Width of each head's query/key/value."""
    d_mlp: int | None = 256
    """Width of the MLP hidden layer; None makes an attention-only model."""
    n_ctx: int = 64
    """Longest context (learned position embeddings)."""
    d_vocab: int = 16
    """Number of token ids."""
    act_fn: str = "gelu"
    """MLP nonlinearity: gelu, relu or silu."""
    layer_norm: bool = True
    """LayerNorm before attention, MLP and unembedding; False leaves the residual stream unnormalised."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""
    seed: int = 0
    """Seed of the initialisation: the same config gives the same weights."""

    def __post_init__(self) -> None:
        if self.act_fn not in ACTIVATIONS:
            raise InterplabError(f"act_fn '{self.act_fn}' is not one of {sorted(ACTIVATIONS)}")
        for name in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab"):
            if getattr(self, name) < 1:
                raise InterplabError(f"ToyConfig.{name} must be >= 1, got {getattr(self, name)}")


class HookPoint(nn.Identity):
    """A named place in the forward pass where hooks attach."""

    @property
    def hooked(self) -> bool:
        """Whether a hook is attached (activations computed only for a hook, such as hook_result, need one)."""
        return bool(self._forward_hooks)


def _edited(point: HookPoint, act: torch.Tensor) -> torch.Tensor | None:
    """Pass an activation computed beside the forward pass through its hook point: the edit (a replacement, or
    `act` changed in place), or None when the hooks left it untouched."""
    if not point.hooked:
        return None
    version = None if act.is_inference() else act._version
    new = point(act)
    if new is not act:
        return new
    return act if version is not None and act._version != version else None


class HookedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm with `hook_scale` (sqrt(var x + eps), [batch, pos, 1]): with no edit it is nn.LayerNorm to the
    bit; an edited scale makes it weight * (x - mean x) / scale + bias. Its state dict is nn.LayerNorm's."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.hook_scale = HookPoint()

    def _edited_scale(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos 1"] | None:
        return _edited(self.hook_scale, norm_scale(self, x)) if self.hook_scale.hooked else None  # no work unhooked

    def normalize(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """(x - mean x) / scale, before the weight (TransformerLens's hook_normalized), the scale hooked."""
        scale = self._edited_scale(x)
        if scale is None:
            return nn.functional.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return normalize_with_scale(self, x, scale)

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        scale = self._edited_scale(x)
        if scale is None:
            return super().forward(x)
        return normalize_with_scale(self, x, scale) * self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        h, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q, self.W_K, self.W_V = (nn.Parameter(torch.empty(h, d, dh)) for _ in range(3))
        self.b_Q, self.b_K, self.b_V = (nn.Parameter(torch.zeros(h, dh)) for _ in range(3))
        self.W_O = nn.Parameter(torch.empty(h, dh, d))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.register_buffer("causal", torch.ones(cfg.n_ctx, cfg.n_ctx).tril().bool(), persistent=False)
        for name in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result"):
            setattr(self, name, HookPoint())

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """softmax(q kᵀ / √d_head + causal mask) v per head, then z @ W_O + b_O (summed over heads)."""
        pos = x.shape[1]
        q = self.hook_q(torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q)  # [batch pos head d_head]
        k = self.hook_k(torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K)
        v = self.hook_v(torch.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V)
        scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / math.sqrt(q.shape[-1])  # [batch head q k]
        scores = self.hook_attn_scores(scores.masked_fill(~self.causal[:pos, :pos], float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = self.hook_z((pattern @ v.transpose(1, 2)).transpose(1, 2))  # [batch pos head d_head]
        if self.hook_result.hooked:  # [batch pos head d_model] is large: only for a hook
            result = _edited(self.hook_result, torch.einsum("bphe,hed->bphd", z, self.W_O))
            if result is not None:
                return result.sum(2) + self.b_O
        return torch.einsum("bphe,hed->bpd", z, self.W_O) + self.b_O


class MLP(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        assert cfg.d_mlp is not None
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_in, self.hook_pre, self.hook_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        x = self.hook_in(x)  # what the MLP reads (ln2's output): a transcoder's input
        pre = self.hook_pre(x @ self.W_in + self.b_in)  # [batch pos d_mlp]
        return self.hook_post(self.act(pre)) @ self.W_out + self.b_out


def _norm(cfg: ToyConfig) -> nn.Module:
    return HookedLayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()


class Block(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.ln1, self.attn = _norm(cfg), Attention(cfg)
        self.has_mlp = cfg.d_mlp is not None
        if self.has_mlp:
            self.ln2, self.mlp = _norm(cfg), MLP(cfg)
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())

    def forward(self, resid_pre: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre)))
        if not self.has_mlp:
            return self.hook_resid_post(resid_pre + attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class ToyTransformer(nn.Module, HookedModel):
    """A GPT-style decoder: embed + position, blocks of (attention, MLP) with pre-LayerNorm, unembed."""

    def __init__(self, cfg: ToyConfig, spec: str = "toy"):
        super().__init__()
        self.cfg = cfg
        self.tokenizer: ByteTokenizer | None = None
        self.extra_config: JSONDict = {}
        """config.json keys beyond the model's own (e.g. what built it), written by `save` and kept by `load`."""
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = _norm(cfg)
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        self.hook_embed, self.hook_pos_embed, self.hook_normalized = HookPoint(), HookPoint(), HookPoint()
        self.hook_ln_final_out = HookPoint()  # ln_final.hook_out (hook points hold no weights: files are unchanged)
        self.info = ModelInfo(
            spec=spec, arch="toy", n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp, n_ctx=cfg.n_ctx, d_vocab=cfg.d_vocab,
        )
        self._hook_names = hook_names_for(
            cfg.n_layers, has_pos_embed=True, has_mlp=cfg.d_mlp is not None, has_resid_mid=cfg.d_mlp is not None,
            has_rotary=False, has_norm=cfg.layer_norm,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Seeded initialisation: weight matrices ~ N(0, init_std²), biases 0, LayerNorm scale 1."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for name, param in sorted(self.named_parameters()):
            with torch.no_grad():
                if name.split(".")[-1].startswith("W_"):
                    param.copy_(torch.randn(param.shape, generator=gen) * self.cfg.init_std)
                elif name.endswith("weight"):  # LayerNorm scale
                    param.fill_(1.0)
                else:
                    param.zero_()

    def forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """Logits. (Overrides `HookedModel.forward`: for the toy model the nn.Module call *is* the forward pass.)"""
        resid = self._embed(tokens)  # [batch pos d_model]
        for block in self.blocks:
            resid = block(resid)
        return self._unembed(self._final_norm(resid))

    def _embed(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """The residual stream before block 0: token embedding + position embedding."""
        return self.hook_embed(self.W_E[tokens]) + self.hook_pos_embed(self.W_pos[: tokens.shape[1]])

    # ---- HookedModel ---------------------------------------------------------------------------------------
    @property
    def hook_names(self) -> list[str]:
        return self._hook_names

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def _forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_vocab"]:
        return self(tokens)

    def _final_norm(self, resid: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """ln_final in two steps, so that `ln_final.hook_normalized` is TransformerLens's (before the weight)."""
        norm = self.ln_final
        normalized = norm.normalize(resid) if isinstance(norm, HookedLayerNorm) else resid
        return self.hook_ln_final_out(split_norm(norm)[1](self.hook_normalized(normalized)))

    def _final_norm_module(self) -> nn.Module:
        return self.ln_final

    def _weigh_normalized(
        self, normalized: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        return split_norm(self.ln_final)[1](normalized)

    def _unembed(
        self, normalized: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_vocab"]:
        return normalized @ self.W_U + self.b_U

    def _attach(self, name: str, fn: ActFn) -> list[Handle]:
        # Every other hook name is the path of its HookPoint (blocks.0.attn.hook_z, ln_final.hook_scale, ...).
        module_path = {"ln_final.hook_normalized": "hook_normalized", "ln_final.hook_out": "hook_ln_final_out"}.get(
            name, name)
        return [hook_module_output(self.get_submodule(module_path), name, fn)]

    # ---- files ---------------------------------------------------------------------------------------------
    marker = TOY_MARKER
    """What `config.json` carries so that `load_model` knows which class rebuilds the folder."""
    config_class: type = ToyConfig
    """The dataclass `config.json` holds, passed to the constructor."""
    config_key = "config"
    """The `config.json` key holding that dataclass."""

    def save(self, path: str | Path) -> None:
        """Write `config.json` + `model.safetensors` into the folder `path` (each file written atomically)."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_url_atomic(f"{path}/model.safetensors", save(state, metadata={"format": "pt"}))
        write_url_atomic(f"{path}/config.json", json.dumps(self._config_json(), indent=2).encode())

    def _config_json(self) -> JSONDict:
        """What `config.json` holds: the marker `load_model` recognises, the config that rebuilds the model, and the
        `extra_config` keys of whoever built it."""
        extra = {k: v for k, v in self.extra_config.items() if k not in ("interplab_model", self.config_key)}
        return {"interplab_model": self.marker, **extra, self.config_key: asdict(self.cfg)}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ToyTransformer:
        """Load a folder written by `save` (unknown config keys, e.g. from a newer version, are ignored)."""
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        if config.get("interplab_model") != cls.marker:
            raise InterplabError(f"{path} does not hold an {cls.__name__} (config.json lacks the marker {cls.marker})")
        state = load_file(path / "model.safetensors")
        cls._check_saved(path, config, state)
        known = {f.name for f in fields(cls.config_class)}
        model = cls(cls.config_class(**{k: v for k, v in config[cls.config_key].items() if k in known}), spec=str(path))
        model.extra_config = {k: v for k, v in config.items() if k not in ("interplab_model", cls.config_key)}
        model.load_state_dict(state)
        return model.to(device).eval()

    @classmethod
    def _check_saved(cls, path: Path, config: JSONDict, state: dict[str, torch.Tensor]) -> None:
        """Raise an InterplabError if the folder is of an outdated layout (nothing to check for plain toy models)."""
