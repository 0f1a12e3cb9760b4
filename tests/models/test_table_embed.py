"""The table-embedding toy model: hook_embed reads a saved table at a hash of the prefix, with no generator known."""

from __future__ import annotations

import json

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models.load import load_model
from interplab.models.table_embed import TableEmbedConfig, TableEmbedTransformer, prefix_rows
from interplab.models.tokens import ByteTokenizer


def python_rows(tokens: list[int], n_rows: int) -> list[int]:
    h, rows = 0, []
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % (2**31 - 1)
        rows.append((h * 0x9E3779B1) % 2**32 % n_rows)
    return rows


@pytest.fixture
def model() -> TableEmbedTransformer:
    m = TableEmbedTransformer(TableEmbedConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, n_ctx=16,
                                               n_rows=50))
    with torch.no_grad():
        m.x_table.copy_(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)))
    return m


def test_embedding_reads_the_table_at_the_prefix_hash(model):
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    assert prefix_rows(tokens, 50)[1].tolist() == python_rows(tokens[1].tolist(), 50)
    embed = model.run_with_cache(tokens, ["hook_embed"]).cache["hook_embed"]
    torch.testing.assert_close(embed[0], model.x_table[python_rows(tokens[0].tolist(), 50)])
    assert isinstance(model.tokenizer, ByteTokenizer) and model.info.arch == "table_embed"


def test_save_load_keeps_the_table_and_the_builders_keys(model, tmp_path):
    model.extra_config["built_by"] = {"anything": 1}
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"]["n_rows"] == 50 and config["built_by"] == {"anything": 1}
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert isinstance(loaded, TableEmbedTransformer) and loaded.extra_config == {"built_by": {"anything": 1}}
    torch.testing.assert_close(loaded.x_table, model.x_table)
    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(tokens), model(tokens))


def test_folder_without_the_table_says_how_to_rebuild(model, tmp_path):
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["model"]  # what planted folders of older versions look like: no model config, no x_table
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InterplabError, match="rebuild it with `interplab synth model --out"):
        load_model(str(tmp_path / "m"), device="cpu")
    with pytest.raises(InterplabError, match="n_rows"):
        TableEmbedConfig(n_rows=0)
