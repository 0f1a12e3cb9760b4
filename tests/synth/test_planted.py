"""The planted model: generator samples in a transformer's residual stream, and the real pipeline run on them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from interplab.cli import main
from interplab.data.packing import pack_tokens
from interplab.errors import InterplabError
from interplab.models.load import load_model
from interplab.models.table_embed import TableEmbedConfig, TableEmbedTransformer
from interplab.models.tokens import ByteTokenizer
from interplab.synth.bench import generator_of
from interplab.synth.configs import PlantedConfig
from interplab.synth.planted import (
    _TABLE_KEY,
    TABLE_CHUNK,
    planted_config,
    planted_generator,
    planted_model,
    true_features,
    truth,
)
from interplab.synth.sparse import derive_seed
from interplab.synth.specs import make_generator

SMALL = "sparse:n_features=48,d=24,mean_active=3"


@pytest.fixture(scope="module")
def planted() -> TableEmbedTransformer:
    return planted_model(PlantedConfig(generator=SMALL, n_samples=5000, n_ctx=32))


def python_rows(tokens: list[int], n_samples: int) -> list[int]:
    """The documented rolling hash, in plain Python integers."""
    h, rows = 0, []
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % (2**31 - 1)
        rows.append((h * 0x9E3779B1) % 2**32 % n_samples)
    return rows


def test_embedding_is_the_table_row_the_prefix_hash_names(planted):
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    embed = planted.run_with_cache(tokens, ["hook_embed"]).cache["hook_embed"]
    for b in range(3):
        rows = python_rows(tokens[b].tolist(), 5000)
        torch.testing.assert_close(embed[b], planted.x_table[rows])
    resid_pre = planted.run_with_cache(tokens, ["blocks.0.hook_resid_pre"]).cache["blocks.0.hook_resid_pre"]
    torch.testing.assert_close(resid_pre, embed)  # the position embedding is zero: the stream is the sample


def test_truth_coefficients_rebuild_the_activations(planted):
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    embed = planted.run_with_cache(tokens, ["hook_embed"]).cache["hook_embed"].reshape(-1, 24)
    batch = truth(planted, tokens)
    # x = Σ_i c_i f_i: the generator's definition, checked against what the model computed
    torch.testing.assert_close(batch.coeffs @ planted_generator(planted).features, embed, atol=1e-5, rtol=1e-5)
    assert ((batch.coeffs > 0) == batch.active).all()
    assert 2.0 < batch.active.sum(1).float().mean() < 4.0  # mean_active=3


def test_same_prefix_same_row_new_prefix_new_row(planted):
    a = torch.tensor([[5, 6, 7, 8]])
    b = torch.tensor([[5, 6, 9, 8]])
    ra, rb = planted.rows(a)[0], planted.rows(b)[0]
    assert ra[:2].tolist() == rb[:2].tolist()            # shared prefix
    assert ra[2] != rb[2] and ra[3] != rb[3]              # the change propagates to every later position
    many = planted.rows(torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(2)))
    distinct = len(many[:, 1:].unique())
    n = many[:, 1:].numel()
    expected = 5000 * (1 - (1 - 1 / 5000) ** n)  # distinct rows of n uniform draws from 5000
    assert abs(distinct - expected) < 4 * expected**0.5


def test_save_and_load_model_round_trip(planted, tmp_path):
    planted.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["interplab_model"] == "interplab.planted_transformer"  # the keys planted folders always had
    assert config["config"]["generator"] == SMALL and config["config"]["n_samples"] == 5000
    torch.testing.assert_close(load_file(tmp_path / "m" / "model.safetensors")["x_table"], planted.x_table)
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    assert isinstance(loaded, TableEmbedTransformer) and loaded.info.arch == "table_embed"
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(tokens), planted(tokens))
    # the truth comes back from the folder alone: config.json's PlantedConfig regenerates the generator
    assert planted_config(loaded) == planted_config(planted)
    torch.testing.assert_close(truth(loaded, tokens[:, :8]).x, truth(planted, tokens[:, :8]).x)
    loaded.save(tmp_path / "again")  # the PlantedConfig survives a load and a save
    assert json.loads((tmp_path / "again" / "config.json").read_text())["config"] == config["config"]


def test_planted_build_matches_a_fresh_generator(planted):
    """The table is the generator's own samples, chunk by chunk, and the blocks are the seeded toy init."""
    gen = make_generator(SMALL)
    first = gen.sample(TABLE_CHUNK, torch.Generator().manual_seed(derive_seed(0, _TABLE_KEY, 0))).x
    torch.testing.assert_close(planted.x_table[:TABLE_CHUNK], first.float())
    assert planted.x_table.shape == (5000, 24) and planted.W_pos.abs().max() == 0
    assert 0.15 < planted.W_U.std() < 0.25  # unembed_std=0.2


def test_folder_from_before_the_table_was_saved_is_a_clear_error(planted, tmp_path):
    """Old planted folders: config.json holds only the PlantedConfig, model.safetensors no x_table."""
    old = tmp_path / "old"
    old.mkdir()
    cfg = {"generator": SMALL, "n_samples": 5000, "n_ctx": 32}
    (old / "config.json").write_text(json.dumps({"interplab_model": "interplab.planted_transformer", "config": cfg}))
    state = {k: v.contiguous() for k, v in planted.state_dict().items() if k != "x_table"}
    save_file(state, old / "model.safetensors")
    with pytest.raises(InterplabError, match=r"interplab synth model --out .*old.* same settings"):
        load_model(str(old), device="cpu")
    # scoring needs only the generator, which the old config.json still names
    assert generator_of(str(old))[0] == SMALL


def test_truth_needs_a_planted_config(tmp_path):
    plain = TableEmbedTransformer(TableEmbedConfig(n_rows=10, d_model=8, n_ctx=8))
    with pytest.raises(InterplabError, match="not built by `interplab synth model`"):
        true_features(plain)
    plain.save(tmp_path / "plain")
    with pytest.raises(InterplabError, match="names no generator"):
        generator_of(str(tmp_path / "plain"))


def test_byte_tokenizer_packs_text():
    contexts = list(pack_tokens(["héllo world"] * 4, ByteTokenizer(), 8))
    assert all(c[0] == 256 for c in contexts)
    assert contexts[0][1:].tolist() == list("héllo world".encode())[:7]


def test_animals_truth_in_both_ontologies():
    model = planted_model(PlantedConfig(
        generator="animals:n_animals=40,n_attributes=8,attributes_per_animal=3,n_independent=6,d=20",
        n_samples=300, n_ctx=16))
    assert set(true_features(model)) == {"animals", "attributes"}
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    x = model.run_with_cache(tokens, ["hook_embed"]).cache["hook_embed"].reshape(-1, 20)
    batch = truth(model, tokens)
    for ontology in ("animals", "attributes"):
        dictionary, coeffs = planted_generator(model).truth(batch, ontology)
        torch.testing.assert_close(coeffs @ dictionary, x, atol=1e-5, rtol=1e-5)


def test_bad_config_is_a_clear_error():
    with pytest.raises(InterplabError, match="unknown synthetic generator"):
        planted_model(PlantedConfig(generator="nope"))
    with pytest.raises(InterplabError, match="n_samples"):
        planted_model(PlantedConfig(generator=SMALL, n_samples=1))


def test_pipeline_store_sae_score_eval(tmp_path, capsys):
    """synth model → harvest → sae train (from the store) → synth score → sae eval, all through the CLI."""
    g = torch.Generator().manual_seed(5)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = [" ".join(words[i] for i in torch.randint(10, (80,), generator=g).tolist()) for _ in range(60)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model, store, saes = tmp_path / "model", tmp_path / "store", tmp_path / "saes"
    common = ["--corpus", str(tmp_path / "docs.jsonl"), "--ctx-len", "32"]
    assert main(["synth", "model", "--generator", SMALL, "--n-samples", "20000", "--n-ctx", "32",
                 "--out", str(model)]) == 0
    assert main(["harvest", "--model", str(model), "--hooks", "hook_embed", "--tokens", "20000",
                 "--out", str(store), *common]) == 0
    assert main(["sae", "train", "--store", str(store), "--hook", "hook_embed", "--arch", "topk", "--k", "3",
                 "--expansion", "2", "--tokens", "150000", "--batch-size", "128", "--lr", "3e-3",
                 "--out", str(saes)]) == 0
    capsys.readouterr()
    assert main(["synth", "score", "--sae", str(saes / "topk-k3-x2"), "--generator", str(model)]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "topk-k3-x2" in line and line.startswith("|"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    mmcs, recovery, random_mmcs = float(cells[6]), float(cells[8]), float(cells[11])
    assert mmcs > 0.9 and recovery > 0.7 and random_mmcs < 0.6, table
    assert main(["sae", "eval", "--sae", str(saes / "topk-k3-x2"), "--model", str(model), "--tokens", "1024",
                 "--out", str(tmp_path / "eval.json"), *common]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["reconstruction"]["explained_variance"] > 0.5
    assert metrics["kl"]["sae"]["mean"] < metrics["kl"]["zero_ablation"]["mean"]



def _snapshot(root) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


SYNTH_MODEL = ["synth", "model", "--generator", SMALL, "--n-samples", "300", "--n-ctx", "16", "--n-layers", "1"]


def _foreign_folders(tmp_path, tiny_llama_dir) -> dict[str, tuple[object, str]]:
    """Folders `synth model --out` must not touch, with the fragment its refusal must hold."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, hf)
    other = tmp_path / "other"
    assert main([*SYNTH_MODEL[:-4], "--n-samples", "400", "--n-ctx", "16", "--out", str(other)]) == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine\n")
    toy = tmp_path / "toy"
    TableEmbedTransformer(TableEmbedConfig(n_rows=10, d_model=8, n_ctx=8)).save(toy)
    return {"hf": (hf, "holds a Hugging Face llama model, not a planted model"),
            "other": (other, "holds a different planted model (differs in: n_layers 2 → 1, n_samples 400 → 300)"),
            "notes": (notes, "is not empty and holds no planted model (found todo.txt)"),
            "toy": (toy, "holds a table-embedding model with no PlantedConfig")}


def test_synth_model_refuses_a_folder_it_did_not_write_with_these_settings(tmp_path, tiny_llama_dir, capsys):
    for name, (folder, fragment) in _foreign_folders(tmp_path, tiny_llama_dir).items():
        before = _snapshot(folder)
        capsys.readouterr()
        assert main([*SYNTH_MODEL, "--out", str(folder)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, (name, err)
        assert _snapshot(folder) == before, name  # byte for byte, and no lock left behind
    file = tmp_path / "file"
    file.write_bytes(b"x")
    assert main([*SYNTH_MODEL, "--out", str(file)]) == 2 and file.read_bytes() == b"x"
    assert "is a file" in capsys.readouterr().err


def test_synth_model_into_its_own_folder_says_already_built_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "m"
    assert main([*SYNTH_MODEL, "--out", str(out)]) == 0
    assert "written" in capsys.readouterr().out
    before = _snapshot(out)
    assert main([*SYNTH_MODEL, "--out", str(out) + "/"]) == 0  # the folder's spelling is not the model's identity
    assert "already holds this planted model; nothing written" in capsys.readouterr().out
    assert _snapshot(out) == before
    assert isinstance(load_model(str(out), device="cpu"), TableEmbedTransformer)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*SYNTH_MODEL, "--out", str(empty)]) == 0 and (empty / "model.safetensors").is_file()


def test_synth_model_rebuilds_its_own_folder_from_before_the_table_was_saved(tmp_path, capsys):
    out = tmp_path / "old"
    assert main([*SYNTH_MODEL, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    state = {k: v.contiguous() for k, v in load_file(out / "model.safetensors").items() if k != "x_table"}
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"interplab_model": config["interplab_model"],
                                                 "config": config["config"]}))
    assert main([*SYNTH_MODEL, "--out", str(out)]) == 0
    assert "x_table" in load_file(out / "model.safetensors")
    assert isinstance(load_model(str(out), device="cpu"), TableEmbedTransformer)
