"""Test data for the store tests: contexts whose rows say which row they are."""

from __future__ import annotations

import torch

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
CTX = 4
DS = {HOOKS[0]: 6, HOOKS[1]: 3}
SHAPES = {hook: (CTX, d) for hook, d in DS.items()}


def make_contexts(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """n contexts of random data. Column 0 of every hook holds the row's global index, and so do the token ids, so a
    yielded row says which row it is and whether its token id travelled with it (exact in every dtype while
    n * CTX <= 256)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(n * CTX).view(n, CTX)
    acts = {}
    for hook, d in DS.items():
        x = torch.randn(n, CTX, d, generator=gen)
        x[..., 0] = rows.float()
        acts[hook] = x
    return acts, rows  # int64 token ids, as a tokenizer returns them
