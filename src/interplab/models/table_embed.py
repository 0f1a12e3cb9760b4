"""A toy transformer whose token embedding is a table read at a hash of the prefix, so that whoever fills the table
decides exactly what the residual stream holds.

    tokens ──► hook_embed = x_table[row(tokens)]   (+ hook_pos_embed = W_pos)   ──► blocks ──► ln_final ──► W_U

Position p of a context reads row_p = `prefix_rows(tokens)[p]`, a hash of its whole prefix tokens[:p+1]: every
position of every context draws an effectively independent row, and the same prefix always draws the same row,
so two runs over the same text (a clean and an SAE-spliced one) see the same vectors. The planted-truth lab
(`interplab.synth.planted`) fills the table with a generator's samples; this module knows nothing of generators.

Saved like `ToyTransformer`: config.json holds the `TableEmbedConfig` under "model" (plus whatever keys the builder
added, kept through load and save), and model.safetensors holds the state dict *including the table* `x_table`
[n_rows, d_model].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError, check_int
from interplab.models.tokens import ByteTokenizer
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.runs import JSONDict

TABLE_EMBED_MARKER = "interplab.planted_transformer"
"""The marker in config.json. Its name predates this module (the planted lab was its first and only user) and is
kept so that `load_model` recognises older planted folders and can say how to rebuild them."""
_HASH_MOD = 2**31 - 1  # a prime: the rolling hash of the prefix lives in [0, 2^31 - 1)
_HASH_BASE = 1_000_003
_MIX = 0x9E3779B1  # odd; h·_MIX < 2^63, so int64 arithmetic never overflows


def prefix_rows(tokens: Int[torch.Tensor, "batch pos"], n_rows: int) -> Int[torch.Tensor, "batch pos"]:
    """The table row each position reads: a rolling hash of tokens[:p+1], mixed, modulo n_rows.

    h_p = (h_{p-1} · 1000003 + t_p + 1) mod (2^31 − 1), h_{-1} = 0;   row_p = ((h_p · 0x9E3779B1) mod 2^32) mod N
    """
    h = torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device)
    rows = torch.empty_like(tokens, dtype=torch.int64)
    for p in range(tokens.shape[1]):
        h = (h * _HASH_BASE + tokens[:, p] + 1) % _HASH_MOD
        rows[:, p] = (h * _MIX) % 2**32 % n_rows
    return rows


@dataclass
class TableEmbedConfig(ToyConfig):
    """A toy transformer's shape, with a table of `n_rows` embedding vectors in place of one vector per token."""

    d_vocab: int = ByteTokenizer.vocab_size
    """Number of token ids (257: the byte tokenizer, which the model then carries as its tokenizer)."""
    n_rows: int = 65_536
    """Rows of the embedding table, read at the hash of each prefix."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("TableEmbedConfig.n_rows", self.n_rows, 1)


class TableEmbedTransformer(ToyTransformer):
    """`ToyTransformer` whose token embedding is the buffer `x_table` [n_rows, d_model] read at `prefix_rows`.

    The table starts at zero: the builder fills it (`model.x_table.copy_(...)`) before saving.
    """

    marker = TABLE_EMBED_MARKER
    config_class = TableEmbedConfig
    config_key = "model"

    def __init__(self, cfg: TableEmbedConfig, spec: str = "table_embed"):
        super().__init__(cfg, spec)
        self.cfg: TableEmbedConfig = cfg
        self.info = replace(self.info, arch="table_embed")
        self.tokenizer = ByteTokenizer() if cfg.d_vocab == ByteTokenizer.vocab_size else None
        self.x_table: torch.Tensor
        self.register_buffer("x_table", torch.zeros(cfg.n_rows, cfg.d_model))  # saved with the weights

    def rows(self, tokens: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
        """The table row each position of `tokens` reads (see `prefix_rows`)."""
        return prefix_rows(tokens, self.cfg.n_rows)

    def _embed(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        table = self.x_table[self.rows(tokens)].to(self.W_E.dtype)  # [batch pos d_model]
        return self.hook_embed(table) + self.hook_pos_embed(self.W_pos[: tokens.shape[1]])

    @classmethod
    def _check_saved(cls, path: Path, config: JSONDict, state: dict[str, torch.Tensor]) -> None:
        """Planted folders written before the table was saved with the weights hold no x_table: they cannot be
        loaded without the generator, which this layer does not know, so they must be rebuilt."""
        if cls.config_key not in config or "x_table" not in state:
            raise InterplabError(
                f"{path} is a planted model written by an older interplab, without its embedding table in "
                f"model.safetensors; rebuild it with `interplab synth model --out {path}` and the same settings "
                "(listed under \"config\" in its config.json)"
            )
