"""The planted model: a small transformer whose residual stream carries a generator's samples, so the real pipeline
(harvest → store → SAE → eval) runs where the truth is known.

    tokens ──► hook_embed = x_table[row(tokens)]   (hook_pos_embed = 0)   ──► blocks ──► ln_final ──► W_U

The model is an ordinary `TableEmbedTransformer` (interplab.models.table_embed), which `load_model` loads without
knowing any generator. This module only BUILDS it and knows its truth:

- `planted_model(cfg)` fills `x_table` with `n_samples` draws of a synthetic generator (`sparse`, `animals`, with any
  settings), zeroes the position embedding (the stream at hook_embed is the sample itself) and draws a random
  unembedding W_U, large enough that the SAE's error shows up as KL. The `PlantedConfig` goes into the model's
  config.json under "config", so that the truth can be regenerated from a saved folder alone.
- `truth(model, tokens)` regenerates the generator's batch for the rows the tokens read (the planted coefficients, in
  every ontology the generator has); `true_features(model)` gives the planted dictionaries.

Position p of a context reads row(tokens)[p], a hash of its whole prefix tokens[:p+1] (`prefix_rows`), so the clean
and the SAE-spliced runs of an evaluation see the same planted vector. At `hook_embed` and `blocks.0.hook_resid_pre`
the activations *are* the generator's samples. Deeper hooks add what the randomly initialised blocks compute from
them (attention mixes earlier positions in), so the truth is exact only at the plant. The byte tokenizer (256 bytes
+ BOS) lets any text corpus drive the model; the text matters only through the hash.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch
from jaxtyping import Float, Int
from safetensors import safe_open

from interplab.errors import InterplabError
from interplab.fileio import join
from interplab.models.table_embed import TABLE_EMBED_MARKER, TableEmbedConfig, TableEmbedTransformer
from interplab.models.tokens import ByteTokenizer
from interplab.models.toy import TOY_MARKER
from interplab.runs import describe_differences, folder_entries, folder_lock, read_json_object, run_settings
from interplab.synth.animals import ONTOLOGIES, Animals
from interplab.synth.configs import PlantedConfig
from interplab.synth.sparse import derive_seed
from interplab.synth.specs import Batch, Generator, make_generator

PLANT_HOOKS = ("hook_embed", "blocks.0.hook_resid_pre")
"""Hooks whose activations are exactly the planted samples."""
PLANTED_KEY = "config"
"""The config.json key holding the PlantedConfig (the key planted folders have always used)."""
TABLE_CHUNK = 4096
"""Table rows drawn per generator call; chunk c is drawn with a generator seeded by (seed, _TABLE_KEY, c)."""
MODEL_CONFIG, MODEL_WEIGHTS = "config.json", "model.safetensors"
"""The two files of a planted-model folder (as of every toy model: `ToyTransformer.save`)."""
_TABLE_KEY = 7  # derive_seed key: the table's stream is unrelated to the generator's training batches


def planted_model(cfg: PlantedConfig, spec: str = "planted") -> TableEmbedTransformer:
    """Build the planted model `cfg` describes (deterministic: the same config gives the same weights and table)."""
    cfg.validate()
    generator = make_generator(cfg.generator)
    model = TableEmbedTransformer(TableEmbedConfig(
        n_layers=cfg.n_layers, d_model=generator.d, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp or None,
        n_ctx=cfg.n_ctx, d_vocab=ByteTokenizer.vocab_size, init_std=cfg.init_std, seed=cfg.seed,
        n_rows=cfg.n_samples), spec)
    with torch.no_grad():
        model.W_pos.zero_()  # the stream at hook_embed is the sample itself
        unit = torch.randn(model.W_U.shape, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 1)))
        model.W_U.copy_(unit * cfg.unembed_std)
        n_chunks = math.ceil(cfg.n_samples / TABLE_CHUNK)
        model.x_table.copy_(torch.cat([_chunk(cfg, generator, c).x for c in range(n_chunks)]).float())
    model.extra_config[PLANTED_KEY] = asdict(cfg)
    return model


def build_planted(cfg: PlantedConfig) -> dict[str, object]:
    """`interplab synth model`: build the planted model, save it to cfg.out, and describe it.

    cfg.out must be new, empty, or a planted model built with the same settings (then nothing is written and
    "already_built" is True); anything else (a Hugging Face model, another planted model, other files) is one
    `InterplabError` naming what is there, raised before anything is written."""
    cfg.validate()
    generator = _generator(cfg.generator)  # a bad generator spec fails here, before the folder is looked at
    built = _already_built(cfg)
    if not built:
        with folder_lock(cfg.out, "synth model"):
            built = _already_built(cfg)  # again under the lock: another process may have built it meanwhile
            if not built:
                planted_model(cfg, spec=cfg.out).save(cfg.out)
    truths = {name: list(d.shape) for name, d in _dictionaries(generator).items()}
    return {"out": cfg.out, "d_model": generator.d, "n_samples": cfg.n_samples, "generator": cfg.generator,
            "exact_hooks": list(PLANT_HOOKS), "true_features": truths, "already_built": built}


def _already_built(cfg: PlantedConfig) -> bool:
    """True if cfg.out holds this planted model; False if there is nothing to keep (new or empty, or this model in
    the layout from before the table was saved, which loads no more); else an `InterplabError` naming what is there."""
    names = folder_entries(cfg.out)
    if not names:
        return False
    if MODEL_CONFIG not in names:
        raise InterplabError(f"{cfg.out} is not empty and holds no planted model (found {', '.join(names[:3])}); "
                             "choose a new or empty --out")
    saved = read_json_object(join(cfg.out, MODEL_CONFIG))
    if saved.get("interplab_model") != TABLE_EMBED_MARKER or not isinstance(saved.get(PLANTED_KEY), Mapping):
        raise InterplabError(f"{cfg.out} holds {_what_model(saved)}, not a planted model written by "
                             "`interplab synth model`; choose a new or empty --out")
    have, want = run_settings(asdict(_config_from(saved[PLANTED_KEY], cfg.out))), run_settings(asdict(cfg))
    changes = describe_differences(have, want)
    if changes:
        raise InterplabError(f"{cfg.out} holds a different planted model (differs in: {changes}); "
                             "choose another --out or delete it")
    return TableEmbedTransformer.config_key in saved and _has_table(Path(cfg.out) / MODEL_WEIGHTS)


def _what_model(config: Mapping[str, object]) -> str:
    """What a foreign config.json describes, for the refusal."""
    if config.get("interplab_model") == TABLE_EMBED_MARKER:
        return "a table-embedding model with no PlantedConfig"
    if config.get("interplab_model") == TOY_MARKER:
        return "an interplab toy model"
    if "model_type" in config:
        return f"a Hugging Face {config['model_type']} model"
    return "a config.json of some other program"


def _has_table(weights: Path) -> bool:
    """Whether the weights file holds the embedding table (False if it is missing or unreadable: rebuild it)."""
    try:
        with safe_open(str(weights), "pt") as f:
            return "x_table" in f.keys()
    except Exception:  # safetensors raises its own error type for a truncated or foreign file; both mean rebuild
        return False


def _dictionaries(generator: Generator) -> dict[str, Float[torch.Tensor, "m d"]]:
    """The planted dictionaries of a generator, by ontology (see `true_features`)."""
    if isinstance(generator, Animals):
        return {o: generator.dictionary(o) for o in ONTOLOGIES}
    return {"features": generator.features}


def planted_config(model: TableEmbedTransformer) -> PlantedConfig:
    """The PlantedConfig the model was built with (kept in its config.json, so a loaded model has it too)."""
    return _config_from(model.extra_config.get(PLANTED_KEY), model.info.spec)


def read_planted_config(folder: str | Path) -> PlantedConfig:
    """The PlantedConfig of a planted-model folder, read from its config.json without loading the weights."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("interplab_model") != TABLE_EMBED_MARKER:
        raise InterplabError(f"{folder} is not a planted model (written by `interplab synth model`), so it names no "
                             "generator; pass a generator spec such as sparse:mean_active=5")
    return _config_from(config.get(PLANTED_KEY), str(folder))


def _config_from(saved: object, where: str) -> PlantedConfig:
    if not isinstance(saved, Mapping) or "generator" not in saved:
        raise InterplabError(f"{where} was not built by `interplab synth model` (its config.json has no PlantedConfig "
                             f"under {PLANTED_KEY!r}), so it names no generator and has no planted truth")
    known = {f.name for f in fields(PlantedConfig)}
    return PlantedConfig(**{k: v for k, v in saved.items() if k in known})


@lru_cache(maxsize=8)
def _generator(spec: str) -> Generator:
    """Generators are deterministic functions of their spec: build each once per process."""
    return make_generator(spec)


def planted_generator(model: TableEmbedTransformer) -> Generator:
    """The generator whose samples fill the model's table, rebuilt from its saved PlantedConfig."""
    cfg = planted_config(model)
    generator = _generator(cfg.generator)
    if generator.d != model.cfg.d_model or cfg.n_samples != model.cfg.n_rows:
        raise InterplabError(f"{model.info.spec}: its PlantedConfig ({cfg.generator}, {cfg.n_samples} samples of "
                             f"d = {generator.d}) does not match its table ({model.cfg.n_rows} x {model.cfg.d_model})")
    return generator


def _chunk(cfg: PlantedConfig, generator: Generator, c: int) -> Batch:
    """Table rows [c·TABLE_CHUNK, (c+1)·TABLE_CHUNK) with everything the generator knows about them."""
    size = min(TABLE_CHUNK, cfg.n_samples - c * TABLE_CHUNK)
    return generator.sample(size, torch.Generator().manual_seed(derive_seed(cfg.seed, _TABLE_KEY, c)))


def truth(model: TableEmbedTransformer, tokens: Int[torch.Tensor, "batch pos"]) -> Batch:
    """The generator's batch (its NamedTuple: x, coefficients, ...) for every position, flattened row-major to
    [batch·pos, ...]. Its `x` equals the activations at hook_embed; pass it to the generator's own truth methods
    (e.g. `Animals.truth(batch, "attributes")`)."""
    cfg, generator = planted_config(model), planted_generator(model)
    rows = model.rows(tokens.cpu()).reshape(-1)
    chunk_of = rows.div(TABLE_CHUNK, rounding_mode="floor")
    chunks = {int(c): _chunk(cfg, generator, int(c)) for c in chunk_of.unique()}
    first = next(iter(chunks.values()))
    gathered = []
    for i, template in enumerate(first):
        out = template.new_empty((len(rows), *template.shape[1:]))
        for c, chunk in chunks.items():
            mine = chunk_of == c
            out[mine] = chunk[i][rows[mine] - c * TABLE_CHUNK]
        gathered.append(out)
    return type(first)(*gathered)


def true_features(model: TableEmbedTransformer) -> dict[str, Float[torch.Tensor, "m d"]]:
    """The planted dictionaries by ontology: {"features": ...} for `sparse`; animals and attributes (each with the
    independent features) for `animals`."""
    return _dictionaries(planted_generator(model))
