"""Language models as decomposition targets (`interplab decompose --model M --layers ...`): no known truth.

The target is any model `interplab.models.load_model` loads. Its forward maps token ids [batch, pos] to logits
[batch, pos, vocab]; the decomposition's output loss is KL(target's next-token distribution ‖ the masked model's),
per token. A toy transformer is itself an nn.Module whose call is that forward; a Hugging Face model is wrapped in
`LogitsModel`, whose `target_root` is the HF model, so --layers are the names of the HF model's `named_modules()`
(interplab.decompose.sites).

Inputs: `n_contexts` contexts of `ctx_len` tokens read once from the corpus (interplab.data.iter_contexts) with the
model's tokenizer, or uniformly random token ids for a model without one (a toy transformer); every batch is a
seeded draw of rows from that pool.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn

from interplab.data.corpus import iter_contexts
from interplab.decompose.sites import target_sites
from interplab.errors import InterplabError
from interplab.models.hooked import HookedModel
from interplab.models.load import load_model


class LogitsModel(nn.Module):
    """A Hugging Face causal LM as tokens -> logits; its weights are named as in the HF model (`target_root`)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @property
    def target_root(self) -> nn.Module:
        """Where target names are resolved: the HF model itself."""
        return self.inner

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Tensor:
        return self.inner(input_ids=tokens, use_cache=False).logits


@dataclass
class LMTarget:
    """A language model to decompose (the GroundTruthModel protocol without a truth: `true_components` is empty)."""

    name: str
    model: nn.Module
    targets: list[str]
    contexts: Int[Tensor, "n ctx"]
    """The pool every batch is drawn from."""
    output_loss: str = "kl"
    has_truth: bool = False

    def sample(self, batch: int, gen: torch.Generator) -> Tensor:
        """`batch` rows of the pool, drawn with replacement by `gen`."""
        rows = torch.randint(self.contexts.shape[0], (batch,), generator=gen, device=gen.device)
        return self.contexts.to(gen.device)[rows]

    def true_components(self) -> dict[str, Tensor]:
        return {}

    def one_hot_inputs(self) -> Tensor:
        """No features to switch on one at a time: the first context (the importance figure shows its tokens)."""
        return self.contexts[:1]


def as_module(hooked: HookedModel) -> nn.Module:
    """The tokens -> logits nn.Module of a loaded model (the toy itself, or the wrapped HF model)."""
    if isinstance(hooked, nn.Module):
        return hooked
    inner = getattr(hooked, "model", None)
    if not isinstance(inner, nn.Module):
        raise InterplabError(f"{hooked.info.spec}: no torch module to decompose behind this model")
    return LogitsModel(inner)


def token_pool(hooked: HookedModel, corpus: str, ctx_len: int, n_contexts: int, seed: int) -> Int[Tensor, "n ctx"]:
    """n_contexts contexts from the corpus (random ids if the model has no tokenizer); an error if too few."""
    if ctx_len > hooked.info.n_ctx:
        raise InterplabError(f"--ctx-len {ctx_len} is longer than the model's context ({hooked.info.n_ctx})")
    if hooked.tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(hooked.info.d_vocab, (n_contexts, ctx_len), generator=gen)
    contexts = list(itertools.islice(iter_contexts(corpus, hooked.tokenizer, ctx_len, seed=seed), n_contexts))
    if len(contexts) < n_contexts:
        raise InterplabError(f"corpus {corpus!r} gives only {len(contexts)} contexts of {ctx_len} tokens; "
                             f"--n-contexts is {n_contexts}")
    return torch.stack(contexts)


def load_lm_target(spec: str, layers: list[str], *, corpus: str, ctx_len: int, n_contexts: int, seed: int,
                   device: str) -> LMTarget:
    """Load the model, check `layers` (interplab.decompose.sites) and read the token pool."""
    hooked = load_model(spec, device=device)
    model = as_module(hooked).requires_grad_(False).eval()
    target_sites(model, layers)
    pool = token_pool(hooked, corpus, ctx_len, n_contexts, seed).to(device)
    return LMTarget(spec, model, list(layers), pool)
