"""Prompt pairs: token structure of ioi / factual / induction, the JSONL reader's checks, and clean_accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from interplab.circuits.prompts import (FACTUAL_CANDIDATES, FACTUAL_KEPT, IOI_FRAMES, NAMES, OBJECTS, PLACES,
                                        PairBatch, clean_accuracy, load_pairs)
from interplab.errors import InterplabError
from interplab.models import load_model
from interplab.models.tokens import ByteTokenizer
from interplab.models.toy import ToyConfig, ToyTransformer


def _corpus() -> list[str]:
    """Every word of the built-in sets many times, so that byte-level BPE learns each as one token."""
    words = NAMES + PLACES + OBJECTS + "Zed Quux".split()
    for frames, items in FACTUAL_CANDIDATES.values():
        words += [w for frame in frames for w in frame.replace("{0}", " ").replace("{1}", " ").replace("{2}", " ")
                  .split()] + [w for subject, answer in items for w in (*subject, answer)]
    words += [w for frame in IOI_FRAMES.values() for w in frame.split() if "{" not in w]
    # each word both after a space and starting a text (the first word of a prompt has no space before it)
    return ([" " + " ".join(words) + " , ; ."] + words) * 20


@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> object:
    """A tiny random Llama whose byte-level BPE tokenizer has every built-in word as one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=None)
    folder = tmp_path_factory.mktemp("word-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(str(folder), device="cpu")


def _one(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, text
    return ids[0]


def _equal_lengths(batch: PairBatch, n: int) -> None:
    assert batch.clean.shape == batch.corrupted.shape == batch.null.shape and batch.clean.shape[0] == n
    assert batch.answer.shape == batch.wrong.shape == (n,) and len(batch.template) == n
    assert (batch.answer != batch.wrong).all()


def test_ioi_pairs_swap_names_and_keep_roles_in_the_null(word_model):
    tok = word_model.tokenizer
    batch = load_pairs(word_model, "ioi", 16, seed=3)
    _equal_lengths(batch, 16)
    assert set(batch.template) == {f"{k}-{o}" for k in IOI_FRAMES for o in ("ABBA", "BABA")}  # 8 templates, 2 each
    name_ids = {_one(tok, " " + name) for name in NAMES}
    for i in range(16):
        clean, io, s = batch.clean[i], int(batch.answer[i]), int(batch.wrong[i])
        assert clean[0] == tok.bos_token_id and {io, s} <= name_ids
        assert (clean == io).sum() == 1 and (clean == s).sum() == 2  # IO once, S twice
        abba = clean.tolist().index(io) < clean.tolist().index(s)
        assert abba == batch.template[i].endswith("ABBA")
        swapped = clean.clone()
        swapped[clean == io], swapped[clean == s] = s, io
        assert torch.equal(batch.corrupted[i], swapped)  # the corrupted prompt: IO and S swapped everywhere
        null = batch.null[i]
        assert torch.equal(null == io, clean == io) and torch.equal(null == s, clean == s)  # names in their roles
        assert (null != clean).sum() == 2  # another place and another object
        text = tok.decode(clean[1:])
        assert text.endswith(" to") and f", {tok.decode([s]).strip()} " in text
    again = load_pairs(word_model, "ioi", 16, seed=3)
    assert torch.equal(again.clean, batch.clean) and not torch.equal(load_pairs(word_model, "ioi", 16, 4).clean,
                                                                      batch.clean)


def test_factual_pairs_swap_the_subject_and_the_null_changes_the_frame(word_model):
    tok = word_model.tokenizer
    batch = load_pairs(word_model, "factual", 12, seed=0)
    _equal_lengths(batch, 12)
    assert sorted(set(batch.template)) == sorted(FACTUAL_KEPT)
    for i in range(12):
        frames, items = FACTUAL_CANDIDATES[batch.template[i]]
        prompts = {frame.format(*subject): (frame, answer) for frame in frames for subject, answer in items}
        clean, corrupted, null = (tok.decode(x[1:]) for x in (batch.clean[i], batch.corrupted[i], batch.null[i]))
        frame, answer = prompts[clean]
        assert batch.answer[i] == _one(tok, " " + answer)
        assert prompts[corrupted] == (frame, tok.decode([int(batch.wrong[i])]).strip())
        assert prompts[null][1] == answer and prompts[null][0] != frame


def test_text_sets_need_a_tokenizer_with_one_token_names():
    toy = ToyTransformer(ToyConfig(d_vocab=257))
    with pytest.raises(InterplabError, match="no tokenizer"):
        load_pairs(toy, "ioi", 4, 0)
    toy.tokenizer = ByteTokenizer()  # every name is several byte tokens
    with pytest.raises(InterplabError, match="names are one token"):
        load_pairs(toy, "ioi", 4, 0)
    with pytest.raises(InterplabError, match="choose from"):
        load_pairs(toy, "nonsense", 4, 0)


def test_induction_repeats_random_tokens_on_a_toy_without_tokenizer():
    toy = ToyTransformer(ToyConfig(d_vocab=16, n_ctx=64))
    batch = load_pairs(toy, "induction", 5, seed=1)
    length = 6  # (16 + 2) // 3: R, R' and the null's fresh ids are distinct
    _equal_lengths(batch, 5)
    assert batch.clean.shape[1] == 2 * length - 1
    for i in range(5):
        clean, corrupted, null = batch.clean[i].tolist(), batch.corrupted[i].tolist(), batch.null[i].tolist()
        r, r2 = clean[:length], corrupted[:length]
        assert clean == r + r[:-1] and len(set(r)) == length and batch.answer[i] == r[-1]
        assert corrupted == r2 + r[:-1] and not set(r) & set(r2) and batch.wrong[i] == r2[-1]
        assert int(batch.answer[i]) not in corrupted
        q = null[:length]
        assert null == q + q[:-1] and q[-2:] == r[-2:] and int(batch.wrong[i]) not in null
        assert not set(q[:-2]) & (set(r) | set(r2))
    with pytest.raises(InterplabError, match="induction needs"):
        load_pairs(ToyTransformer(ToyConfig(d_vocab=4)), "induction", 2, 0)


def test_induction_with_a_tokenizer_starts_with_bos_and_avoids_special_ids(word_model):
    bos = word_model.tokenizer.bos_token_id
    batch = load_pairs(word_model, "induction", 8, seed=0)
    assert batch.clean.shape == (8, 1 + 2 * 20 - 1)
    for tokens in (batch.clean, batch.corrupted, batch.null):
        assert (tokens[:, 0] == bos).all() and not (tokens[:, 1:] == bos).any()
    assert not (batch.answer == bos).any() and not (batch.wrong == bos).any()


def _write(path: Path, lines: list[object]) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


GOOD = {"clean": "When Mary and John went to the store, John gave a drink to",
        "corrupted": "When Mary and John went to the store, Mary gave a drink to", "answer": " Mary", "wrong": " John"}


def test_jsonl_reads_pairs_and_fills_a_missing_null(word_model, tmp_path):
    tok = word_model.tokenizer
    other = {**GOOD, "clean": GOOD["clean"].replace("store", "park")}
    path = _write(tmp_path / "p.jsonl", [GOOD, "", other, {**GOOD, "null": other["clean"], "template": "t2"}, "{x"])
    batch = load_pairs(word_model, path, 3, seed=0)
    ids = [tok.bos_token_id] + tok.encode(GOOD["clean"], add_special_tokens=False)
    assert batch.clean[0].tolist() == ids and batch.template == ["jsonl", "jsonl", "t2"]
    assert batch.answer.tolist() == [_one(tok, " Mary")] * 3 and batch.wrong.tolist() == [_one(tok, " John")] * 3
    # lines 1 and 3 have no null: each gets the other's clean prompt (same template, answer and wrong); line 4 gives
    # its own; line 5 (bad JSON) is past the 3 pairs asked for, so it is never read
    assert torch.equal(batch.null[0], batch.clean[1]) and torch.equal(batch.null[1], batch.clean[0])
    assert torch.equal(batch.null[2], batch.clean[1])


@pytest.mark.parametrize("lines, n, message", [
    ([GOOD, "{not json"], 2, "line 2: invalid JSON"),
    ([GOOD, {k: v for k, v in GOOD.items() if k != "wrong"}], 2, "line 2: missing field.*wrong"),
    ([GOOD, {**GOOD, "corrupted": "Mary gave a drink to"}], 2, "line 2: token lengths differ"),
    ([GOOD, {**GOOD, "clean": "Mary gave a drink to", "corrupted": "John gave a drink to"}], 2,
     r"line 2: prompts have \d+ tokens but line 1 has \d+"),
    ([GOOD, {**GOOD, "answer": " Mary John"}], 2, "line 2: answer ' Mary John' is 2 tokens"),
    ([GOOD, {**GOOD, "wrong": 7}], 2, "line 2: field 'wrong' must be a string"),
    ([GOOD], 2, "has 1 prompt pairs; 2 were asked for"),
])
def test_jsonl_errors_name_the_line(word_model, tmp_path, lines, n, message):
    with pytest.raises(InterplabError, match=message):
        load_pairs(word_model, _write(tmp_path / "bad.jsonl", lines), n, seed=0)


def test_jsonl_missing_file(word_model, tmp_path):
    with pytest.raises(InterplabError, match="does not exist"):
        load_pairs(word_model, str(tmp_path / "none.jsonl"), 1, seed=0)


def test_clean_accuracy_counts_wins_per_template():
    """A stand-in model whose last-position logits are one-hot on the prompt's first token (so it 'answers' it)."""
    def forward(tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, 10)
        logits[torch.arange(len(tokens)), -1, tokens[:, 0]] = 2.0
        return logits

    model = SimpleNamespace(forward=forward, device=torch.device("cpu"))
    answer, wrong = torch.tensor([1, 1, 1, 1]), torch.tensor([2, 2, 2, 2])
    clean = torch.tensor([[1, 0], [1, 0], [1, 0], [2, 0]])  # 3 of 4 right: template a 2/2, b 1/2
    corrupted = torch.tensor([[2, 0], [1, 0], [2, 0], [2, 0]])  # wrong wins in 3 of 4: a 1/2, b 2/2
    null = torch.tensor([[1, 0], [1, 0], [3, 0], [1, 0]])  # a tie (3) is not a win
    acc = clean_accuracy(model, PairBatch(clean, corrupted, null, answer, wrong, ["a", "a", "b", "b"]))
    assert acc == {"clean": 0.75, "corrupted": 0.75, "null": 0.75, "clean_logit_diff": 1.0,
                   "corrupted_logit_diff": -1.0, "null_logit_diff": 1.5, "clean/a": 1.0, "corrupted/a": 0.5,
                   "clean/b": 0.5, "corrupted/b": 1.0}


@pytest.mark.slow
def test_smollm2_solves_the_kept_templates():
    model = load_model("smollm2-135m", device="cpu")
    factual = clean_accuracy(model, load_pairs(model, "factual", 96, seed=0))
    for name in FACTUAL_KEPT:
        assert factual[f"clean/{name}"] >= 0.8, (name, factual)
    ioi = clean_accuracy(model, load_pairs(model, "ioi", 32, seed=0))
    assert ioi["clean_logit_diff"] > 0 > ioi["corrupted_logit_diff"], ioi
    induction = clean_accuracy(model, load_pairs(model, "induction", 16, seed=0))
    assert induction["clean"] >= 0.8, induction


def test_a_template_of_another_length_is_left_out(word_model, monkeypatch):
    longer = "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to"
    monkeypatch.setattr("interplab.circuits.prompts.IOI_FRAMES", {"a": longer, "b": longer.replace("When", "After"),
                                                                   "long": longer.replace("gave", "then gave")})
    batch = load_pairs(word_model, "ioi", 8, seed=0)
    assert sorted(set(batch.template)) == ["a-ABBA", "a-BABA", "b-ABBA", "b-BABA"]
    assert batch.clean.shape == (8, 15)  # BOS + 14 one-token words
