"""`HookedModel`: the one interface every model in interplab offers, whatever its origin.

Subclasses say how to attach a function at a named hook point (`_attach`) and how to run a forward pass
(`_forward`); everything a researcher calls — `run_with_cache`, `run_with_hooks`, the `hooks` context — lives here
once.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError
from interplab.models.hooks import (
    BLOCK_HOOKS,
    FINAL_HOOKS,
    HEAD_HOOKS,
    ActFn,
    Handle,
    HookFn,
    StopForward,
    normalize_with_scale,
    parse_block_hook,
)
from interplab.models.tokens import ByteTokenizer

if TYPE_CHECKING:  # for the annotation only: toy-model users need not import transformers
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelInfo:
    """The shape facts of a model that analysis code needs."""

    spec: str
    """The spec the model was loaded from (hub id, path, `smollm2-135m`, ...)."""
    arch: str
    """Architecture family: `llama`, `gpt2`, `gpt_neox`, `toy`, ..."""
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    """Key/value heads: fewer than n_heads under grouped-query attention (hook_k, hook_v have this many)."""
    d_head: int
    d_mlp: int | None
    """Width of the MLP hidden layer (`mlp.hook_post`); None for attention-only models."""
    n_ctx: int
    """Longest context the model accepts."""
    d_vocab: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CacheResult(NamedTuple):
    logits: Float[torch.Tensor, "batch pos d_vocab"] | None
    """None unless logits were asked for (the forward pass then stops at the last requested hook)."""
    cache: dict[str, torch.Tensor]
    """Activations by hook name, detached."""


class Prefix(NamedTuple):
    """A clean forward pass up to one hook, kept so that many variants can each run only the rest of the model."""

    hook: str
    act: torch.Tensor
    """The clean activation at `hook`."""
    layer: int | None
    """The block holding `hook` (None for hooks outside the blocks)."""
    block_args: tuple
    """What that block was called with (its input first), reused to call it and the blocks after it."""
    block_kwargs: dict[str, Any]
    tokens: torch.Tensor

    @property
    def block_input(self) -> torch.Tensor:
        """The residual stream entering the block that holds the hook."""
        return self.block_args[0] if self.block_args else self.block_kwargs["hidden_states"]

    def repeated(self, times: int) -> Prefix:
        """This prefix for `times` stacked copies of its batch (copy-major), so that several variants run in one
        suffix pass: every batch-first tensor it holds (the activation, the block's inputs such as masks and rotary
        tables) is repeated along the batch; tensors shared by the whole batch (a leading dimension of 1) and 1-D
        ones (cache positions) stay as they are."""
        if times == 1:
            return self
        batch = self.act.shape[0]

        def rep(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch:
                return value.repeat(times, *[1] * (value.ndim - 1))
            if isinstance(value, tuple):
                return tuple(rep(v) for v in value)
            return value

        return Prefix(self.hook, rep(self.act), self.layer, rep(self.block_args),
                      {k: rep(v) for k, v in self.block_kwargs.items()}, rep(self.tokens))


class HookedModel(ABC):
    """A language model with TransformerLens-named hook points."""

    info: ModelInfo
    tokenizer: PreTrainedTokenizerBase | ByteTokenizer | None
    """A transformers tokenizer, the byte tokenizer of table-embedding models, or None (token ids only)."""
    blocks: Sequence[torch.nn.Module]
    """The transformer blocks in order: each maps the residual stream to the next, given the extra inputs the
    model passes every block alike (masks, rotary embeddings)."""

    # ---- what a subclass provides -------------------------------------------------------------------------
    @property
    @abstractmethod
    def hook_names(self) -> list[str]:
        """Every valid hook name of this model, in the order a forward pass reaches them."""

    @abstractmethod
    def _attach(self, name: str, fn: ActFn) -> list[Handle]:
        """Attach `fn` at hook `name`; return handles with a `.remove()`."""

    @abstractmethod
    def _forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """Plain forward pass returning logits."""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...


    @abstractmethod
    def _final_norm(self, resid: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        """ln_final, with its hook points (the output of this is `ln_final.hook_out`)."""

    @abstractmethod
    def _final_norm_module(self) -> torch.nn.Module:
        """ln_final as a module (LayerNorm, RMSNorm, or nn.Identity for none)."""

    @abstractmethod
    def _weigh_normalized(
        self, normalized: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """ln_final's weight (and bias) applied to `ln_final.hook_normalized`: what ln_final outputs."""

    @abstractmethod
    def _unembed(
        self, normalized: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """Logits from the normalised final residual stream."""

    # ---- the public interface -----------------------------------------------------------------------------
    def check_hook_names(self, names: Sequence[str]) -> None:
        """Raise an InterplabError naming any unknown hook and listing the valid ones."""
        valid = self.hook_names
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise InterplabError(
                f"unknown hook name(s) {unknown} for {self.info.spec} ({self.info.arch}, {self.info.n_layers} layers); "
                f"valid names: {_summarise_hook_names(valid, self.info.n_layers)}"
            )

    def hook_dim(self, name: str) -> int | None:
        """Width of the per-token vector at a hook point; None for the per-head points (`attn.hook_q`, ...,
        `attn.hook_pattern` [batch, head, q, k], `attn.hook_result`), whose activations are not [batch, pos, width].
        """
        self.check_hook_names([name])
        parsed = parse_block_hook(name)
        if parsed is not None and parsed[1] in HEAD_HOOKS:
            return None
        if name.endswith("hook_scale"):
            return 1
        if name.endswith(("mlp.hook_post", "mlp.hook_pre")):
            return self.info.d_mlp
        return self.info.d_model

    def normalize_final(
        self, resid: Float[torch.Tensor, "*batch d_model"], scale: Float[torch.Tensor, "*batch 1"]
    ) -> Float[torch.Tensor, "*batch d_model"]:
        """ln_final's normalisation with a frozen scale (e.g. the cached `ln_final.hook_scale`), before its weight:
        (resid - mean resid) / scale for LayerNorm, resid / scale for RMSNorm. Linear in resid, so it can be applied
        to each part of a decomposed residual stream; with the cached scale,
        `_unembed(_weigh_normalized(normalize_final(resid, scale)))` gives the logits."""
        return normalize_with_scale(self._final_norm_module(), resid, scale)

    def check_tokens(self, tokens: torch.Tensor) -> Int[torch.Tensor, "batch pos"]:
        """Validate a token batch and move it to the model's device."""
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise InterplabError(f"tokens must be an int64/int32 tensor of token ids, got {_describe(tokens)}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise InterplabError(f"tokens must have shape [batch, pos] with pos >= 1, got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.info.n_ctx:
            raise InterplabError(f"{tokens.shape[1]} positions exceed the model's context length {self.info.n_ctx}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.info.d_vocab:
            raise InterplabError(f"token ids must lie in [0, {self.info.d_vocab}), got range [{lo}, {hi}]")
        return tokens.to(self.device, torch.long)

    @contextlib.contextmanager
    def hooks(self, hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
        """Attach `(name, fn)` pairs for the duration of the block; they are removed even if the block raises.

        Hooks are attached in forward order, so at one site an earlier-named hook sees the edits of none that come
        later, and two hooks on the same name run in the order given.
        """
        self.check_hook_names([name for name, _ in hooks])
        order = {name: i for i, name in enumerate(self.hook_names)}
        handles: list[Handle] = []
        try:
            for name, fn in sorted(hooks, key=lambda pair: order[pair[0]]):
                handles += self._attach(name, _bind(fn, name))
            yield
        finally:
            for handle in reversed(handles):
                handle.remove()

    def forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """Logits of a plain forward pass (no hooks of ours)."""
        return self._forward(self.check_tokens(tokens))

    def run_with_hooks(
        self, tokens: Int[torch.Tensor, "batch pos"], hooks: Sequence[tuple[str, HookFn]]
    ) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """Forward pass with `fn(act, name) -> replacement | None` applied at each named hook point.

        Gradients follow the caller's mode: wrap in `torch.no_grad()` when you do not need them.
        """
        tokens = self.check_tokens(tokens)
        with self.hooks(hooks):
            return self._forward(tokens)

    @torch.no_grad()  # not inference_mode: cached tensors must stay usable in autograd (e.g. to train probes)
    def run_with_cache(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        names: Sequence[str] | None = None,
        *,
        return_logits: bool = False,
        hooks: Sequence[tuple[str, HookFn]] = (),
    ) -> CacheResult:
        """Read activations at `names` (all hook points if None).

        Unless `return_logits`, the forward pass stops right after the last requested activation is read, so
        caching an early layer costs only the layers up to it. `hooks` are applied too (they run before the cache
        reads a site, so the cache holds the edited activation).
        """
        names = list(self.hook_names if names is None else names)
        if not names:
            raise InterplabError("run_with_cache needs at least one hook name")
        if len(set(names)) != len(names):
            raise InterplabError(f"duplicate hook names in {names}")
        tokens = self.check_tokens(tokens)
        cache: dict[str, torch.Tensor] = {}

        def reader(act: torch.Tensor, name: str) -> None:
            cache[name] = act.detach()
            if not return_logits and len(cache) == len(names):
                raise StopForward

        logits = None
        with self.hooks([*hooks, *[(name, reader) for name in names]]):
            try:
                logits = self._forward(tokens)
            except StopForward:
                pass
        return CacheResult(logits if return_logits else None, cache)


    # ---- prefix and suffix: many variants of one activation, one clean prefix ------------------------------
    @torch.no_grad()
    def run_prefix(self, tokens: Int[torch.Tensor, "batch pos"], hook: str) -> Prefix:
        """Run the model up to `hook` (and no further), keeping what `run_suffix` needs to finish the pass.

        Splicing k variants of the activation at `hook` then costs one prefix plus k suffixes, instead of k
        full forward passes.
        """
        return self.run_prefixes(tokens, [hook])[hook]

    @torch.no_grad()
    def run_prefixes(self, tokens: Int[torch.Tensor, "batch pos"], hooks: Sequence[str]) -> dict[str, Prefix]:
        """`run_prefix` for several hooks from one forward pass (stopped after the last of them)."""
        self.check_hook_names(list(hooks))
        tokens = self.check_tokens(tokens)
        layers = {h: (parsed[0] if (parsed := parse_block_hook(h)) else None) for h in hooks}
        captured: dict[int, tuple[tuple, dict[str, Any]]] = {}

        def keeper(layer: int) -> Callable[..., None]:
            def keep_block_inputs(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                captured[layer] = (args, dict(kwargs))
            return keep_block_inputs

        handles = [self.blocks[l].register_forward_pre_hook(keeper(l), with_kwargs=True)
                   for l in sorted({l for l in layers.values() if l is not None})]
        try:
            cache = self.run_with_cache(tokens, list(hooks)).cache
        finally:
            for handle in handles:
                handle.remove()
        return {h: Prefix(h, cache[h], l, *(captured[l] if l is not None else ((), {})), tokens)
                for h, l in layers.items()}

    def run_suffix(
        self, prefix: Prefix, replacement: torch.Tensor, *, last_only: bool = False
    ) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """Logits of the forward pass whose activation at `prefix.hook` is `replacement`; only the block holding
        the hook and the ones after it run. Gradients follow the caller's mode (so a suffix can be trained through).

        `last_only` returns the last position's logits alone (`[batch, 1, d_vocab]`): a metric read there need not
        pay for unembedding every position, which for a large vocabulary costs as much as several blocks.
        """
        if not isinstance(replacement, torch.Tensor) or replacement.shape != prefix.act.shape:
            raise InterplabError(f"replacement for '{prefix.hook}' must have shape {tuple(prefix.act.shape)}, "
                                 f"got {_describe(replacement)}")
        keep = slice(-1, None) if last_only else slice(None)
        if prefix.hook == "ln_final.hook_out":
            return self._unembed(replacement[:, keep])
        if prefix.hook == "ln_final.hook_normalized":
            return self._unembed(self._weigh_normalized(replacement[:, keep]))
        if prefix.layer is None:  # embedding hooks: everything after them is the whole model
            return self.run_with_hooks(prefix.tokens, [(prefix.hook, lambda act, name: replacement)])[:, keep]
        point = parse_block_hook(prefix.hook)[1]  # type: ignore[index]
        if point == "hook_resid_post":
            resid = replacement
        elif point == "hook_resid_pre":
            resid = self._call_block(prefix, prefix.layer, replacement)
        else:
            with self.hooks([(prefix.hook, lambda act, name: replacement)]):
                resid = self._call_block(prefix, prefix.layer, prefix.block_input)
        for layer in range(prefix.layer + 1, len(self.blocks)):
            resid = self._call_block(prefix, layer, resid)
        return self._unembed(self._final_norm(resid[:, keep]))

    def _call_block(self, prefix: Prefix, layer: int, resid: torch.Tensor) -> torch.Tensor:
        """Call block `layer` on `resid` with the extra inputs the prefix pass gave its block."""
        args, kwargs = prefix.block_args, prefix.block_kwargs
        if args:
            out = self.blocks[layer](resid, *args[1:], **kwargs)
        else:
            out = self.blocks[layer](**{**kwargs, "hidden_states": resid})
        return out[0] if isinstance(out, tuple) else out


def _bind(fn: HookFn, name: str) -> ActFn:
    return lambda act: fn(act, name)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _summarise_hook_names(names: list[str], n_layers: int) -> str:
    """The valid names, with the per-block ones written once as `blocks.{0..L-1}.X`."""
    block_suffixes = [h for h in BLOCK_HOOKS if f"blocks.0.{h}" in names]
    before = [n for n in names if parse_block_hook(n) is None and n not in FINAL_HOOKS]
    per_block = [f"blocks.{{0..{n_layers - 1}}}.{h}" for h in block_suffixes]
    return ", ".join(before + per_block + [n for n in FINAL_HOOKS if n in names])
