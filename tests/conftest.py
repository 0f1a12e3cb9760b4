"""Fixtures shared across the test suite: tiny random HF models with a real (tiny) tokenizer, built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_DEFAULT_THREADS = torch.get_num_threads()


STARTS_PROCESSES = {"torchrun", "two_ranks"}
"""Fixtures that launch several processes with torchrun: a test that uses one (directly or through another fixture)
is marked `distributed`."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if STARTS_PROCESSES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.distributed)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """One torch thread for the fast tests: their tensors are tiny, and two threads contending on a busy 2-core
    machine made a small matmul ~500x slower. Slow tests (the real model) keep the default."""
    torch.set_num_threads(_DEFAULT_THREADS if item.get_closest_marker("slow") else 1)


TINY_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language that lets you work quickly.",
    "Sparse autoencoders decompose activations into interpretable features.",
    "A residual stream carries information between the layers of a transformer.",
] * 4


def tiny_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style: <|endoftext|> is both BOS and EOS) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _tiny_config(arch: str, vocab: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch in ("gpt2", "gpt2-wide"):
        return GPT2Config(n_layer=3, n_embd=32 if arch == "gpt2" else 256, n_head=4, vocab_size=vocab,
                          n_positions=64, bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=0, pad_token_id=None)
    if arch in ("neox", "neox-sequential"):
        return GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             vocab_size=vocab, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                             use_parallel_residual=arch == "neox")
    raise ValueError(arch)


def build_tiny_hf_model(arch: str, folder: Path) -> Path:
    """Save a seeded random model of `arch` (gpt2, gpt2-wide, llama, neox, neox-sequential) and a tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["gpt2", "llama", "neox", "neox-sequential"])
def tiny_hf_dir(request, tmp_path_factory) -> Path:
    return build_tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_hf_model("gpt2", tmp_path_factory.mktemp("gpt2-single"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_hf_model("llama", tmp_path_factory.mktemp("llama-single"))


@pytest.fixture(scope="session")
def wide_gpt2_dir(tmp_path_factory) -> Path:
    """A GPT-2 wide enough that a harvest lasts a few seconds, so that it can be interrupted mid-way."""
    return build_tiny_hf_model("gpt2-wide", tmp_path_factory.mktemp("gpt2-wide"))


def _run_torchrun(args: list[str], *, nproc: int = 2, timeout: float = 180, check: bool = True):
    """Run `torchrun --standalone --nproc_per_node nproc ARGS` (a free port each time, one thread per rank)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="session")
def torchrun():
    """Run a command under torchrun on this machine: torchrun(["-m", "interplab", "harvest", ...], nproc=2)."""
    return _run_torchrun
