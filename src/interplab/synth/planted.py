"""A small transformer whose residual stream carries a generator's samples, so the real pipeline (harvest → store →
SAE → eval) runs where the truth is known.

    tokens ──► hook_embed = x_table[row(tokens)]   (hook_pos_embed = 0)   ──► blocks ──► ln_final ──► W_U

`x_table` holds `n_samples` draws of a synthetic generator (`sparse`, `animals`, with any settings). Position p of a
context reads row(tokens)[p], a hash of its whole prefix tokens[:p+1]: every position of every context draws an
effectively independent row, and the same prefix always draws the same row, so the clean and the SAE-spliced runs
of an evaluation see the same planted vector. `truth(tokens)` regenerates the generator's batch for those rows (the
planted coefficients, in every ontology the generator has).

At `hook_embed` and `blocks.0.hook_resid_pre` the activations *are* the generator's samples. Deeper hooks add what
the randomly initialised blocks compute from them (attention mixes earlier positions in), so the truth is exact only
at the plant. A byte tokenizer (256 bytes + BOS) lets any text corpus drive the model; the text matters only through
the hash. The unembedding is a random readout, large enough that the SAE's error shows up as KL.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from jaxtyping import Float, Int

from interplab.errors import InterplabError
from interplab.models.load import PLANTED_MARKER
from interplab.models.toy import ToyConfig, ToyTransformer
from interplab.synth.sparse import check_int, derive_seed

PLANT_HOOKS = ("hook_embed", "blocks.0.hook_resid_pre")
"""Hooks whose activations are exactly the planted samples."""
TABLE_CHUNK = 4096
"""Table rows drawn per generator call; chunk c is drawn with a generator seeded by (seed, _TABLE_KEY, c)."""
_TABLE_KEY = 7  # derive_seed key: the table's stream is unrelated to the generator's training batches
_HASH_MOD = 2**31 - 1  # a prime: the rolling hash of the prefix lives in [0, 2^31 - 1)
_HASH_BASE = 1_000_003
_MIX = 0x9E3779B1  # odd; h·_MIX < 2^63, so int64 arithmetic never overflows


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 and BOS = 256: what `pack_tokens` needs, with nothing to download."""

    bos_token_id = 256
    eos_token_id = None
    vocab_size = 257

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [list(text.encode("utf-8")) for text in texts]}


@dataclass
class PlantedConfig:
    """A toy transformer whose embedding is a synthetic generator's samples (the truth is known at hook_embed)."""

    generator: str = "sparse"
    """Generator spec planted at hook_embed (sparse, animals, or with settings: sparse:mean_active=10)."""
    n_samples: int = 65_536
    """Rows of the table of planted samples (memory: n_samples x d floats; 64 MB at the defaults)."""
    n_layers: int = 2
    """Transformer blocks after the plant."""
    n_heads: int = 4
    """Attention heads per block."""
    d_head: int = 16
    """Width of each head."""
    d_mlp: int = 512
    """MLP width; 0 makes the blocks attention-only."""
    n_ctx: int = 128
    """Longest context."""
    init_std: float = 0.02
    """Standard deviation of the random block weights (how much the blocks add to the planted stream)."""
    unembed_std: float = 0.2
    """Standard deviation of the random readout W_U, in units where the final LayerNorm's output has norm sqrt(d)."""
    seed: int = 0
    """Seed of the table and the block weights (the generator's own seed is part of its spec)."""
    out: str = "planted-model"
    """Folder the model is written to (`synth model`); pass it to harvest, sae train and sae eval as --model."""

    def validate(self) -> None:
        check_int("n_samples", self.n_samples, 2)
        check_int("n_ctx", self.n_ctx, 2)
        check_int("d_mlp", self.d_mlp, 0)
        for name in ("init_std", "unembed_std"):
            if not getattr(self, name) >= 0:
                raise InterplabError(f"{name} must be >= 0, got {getattr(self, name)}")


class PlantedTransformer(ToyTransformer):
    """`ToyTransformer` with the token embedding replaced by a table of planted generator samples."""

    def __init__(self, cfg: PlantedConfig, spec: str = "planted"):
        from interplab.synth.specs import make_generator

        cfg.validate()
        generator = make_generator(cfg.generator)
        toy = ToyConfig(n_layers=cfg.n_layers, d_model=generator.d, n_heads=cfg.n_heads, d_head=cfg.d_head,
                        d_mlp=cfg.d_mlp or None, n_ctx=cfg.n_ctx, d_vocab=ByteTokenizer.vocab_size,
                        init_std=cfg.init_std, seed=cfg.seed)
        super().__init__(toy, spec)
        self.planted, self.generator = cfg, generator
        self.tokenizer = ByteTokenizer()
        self.info = replace(self.info, arch="planted")
        with torch.no_grad():
            self.W_pos.zero_()  # the stream at hook_embed is the sample itself
            unit = torch.randn(self.W_U.shape, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 1)))
            self.W_U.copy_(unit * cfg.unembed_std)
        table = torch.cat([self._chunk(c).x for c in range(math.ceil(cfg.n_samples / TABLE_CHUNK))])
        self.register_buffer("x_table", table.float(), persistent=False)  # [n_samples d_model]

    def _chunk(self, c: int) -> Any:
        size = min(TABLE_CHUNK, self.planted.n_samples - c * TABLE_CHUNK)
        return self.generator.sample(size, torch.Generator().manual_seed(derive_seed(self.planted.seed, _TABLE_KEY, c)))

    def rows(self, tokens: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
        """The table row each position reads: a rolling hash of tokens[:p+1], mixed, modulo n_samples.

        h_p = (h_{p-1} · 1000003 + t_p + 1) mod (2^31 − 1), h_{-1} = 0;   row_p = ((h_p · 0x9E3779B1) mod 2^32) mod N
        """
        h = torch.zeros(tokens.shape[0], dtype=torch.int64, device=tokens.device)
        rows = torch.empty_like(tokens, dtype=torch.int64)
        for p in range(tokens.shape[1]):
            h = (h * _HASH_BASE + tokens[:, p] + 1) % _HASH_MOD
            rows[:, p] = (h * _MIX) % 2**32 % self.planted.n_samples
        return rows

    def truth(self, tokens: Int[torch.Tensor, "batch pos"]) -> Any:
        """The generator's batch (its NamedTuple: x, coefficients, ...) for every position, flattened row-major to
        [batch·pos, ...]. Its `x` equals the activations at hook_embed; pass it to the generator's own truth methods
        (e.g. `Animals.truth(batch, "attributes")`)."""
        rows = self.rows(tokens.cpu()).reshape(-1)
        chunk_of = rows.div(TABLE_CHUNK, rounding_mode="floor")
        chunks = {int(c): self._chunk(int(c)) for c in chunk_of.unique()}
        first = next(iter(chunks.values()))
        gathered = []
        for i, template in enumerate(first):
            out = template.new_empty((len(rows), *template.shape[1:]))
            for c, chunk in chunks.items():
                mine = chunk_of == c
                out[mine] = chunk[i][rows[mine] - c * TABLE_CHUNK]
            gathered.append(out)
        return type(first)(*gathered)

    def true_features(self) -> dict[str, Float[torch.Tensor, "m d"]]:
        """The planted dictionaries by ontology: {"features": ...} for `sparse`; animals and attributes (each with
        the independent features) for `animals`."""
        if hasattr(self.generator, "dictionary"):
            from interplab.synth.animals import ONTOLOGIES

            return {o: self.generator.dictionary(o) for o in ONTOLOGIES}
        return {"features": self.generator.features}

    def _embed(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
        planted = self.x_table[self.rows(tokens)].to(self.W_E.dtype)  # [batch pos d_model]
        return self.hook_embed(planted) + self.hook_pos_embed(self.W_pos[: tokens.shape[1]])

    marker = PLANTED_MARKER
    config_class = PlantedConfig

    def _config_json(self) -> dict[str, Any]:
        return {"interplab_model": self.marker, "config": asdict(self.planted)}


def build_planted(cfg: PlantedConfig) -> dict[str, Any]:
    """`interplab synth model`: build the planted model, save it to cfg.out, and describe it."""
    model = PlantedTransformer(cfg, spec=cfg.out)
    model.save(cfg.out)
    truths = {name: list(d.shape) for name, d in model.true_features().items()}
    return {"out": cfg.out, "d_model": model.cfg.d_model, "n_samples": cfg.n_samples, "generator": cfg.generator,
            "exact_hooks": list(PLANT_HOOKS), "true_features": truths}
