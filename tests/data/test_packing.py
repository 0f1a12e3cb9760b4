"""pack_tokens: exact outputs on tiny hand-worked examples, then invariants on a larger random stream.

Token ids (see conftest): word 'tN' -> N; <pad>=0, <bos>=1, <eos>=2, <unk>=3, <|endoftext|>=4.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from interplab.data import iter_contexts, pack_tokens
from interplab.errors import InterplabError

PAD, BOS, EOS, ENDOFTEXT = 0, 1, 2, 4

# Stream without separators: 10 11 12 | 13 14 | 15 16 17 18 19 20  (11 tokens)
DOCS = ["t10 t11 t12", "t13 t14", "t15 t16 t17 t18 t19 t20"]


def packed(docs, tokenizer, ctx_len, **kwargs) -> list[list[int]]:
    return [context.tolist() for context in pack_tokens(docs, tokenizer, ctx_len, **kwargs)]


def test_bos_and_eos_prepends_bos_and_separates_with_eos(tok_bos_eos):
    # stream: 10 11 12 <eos> 13 14 <eos> 15 16 17 18 19 20; each context is <bos> + 3 stream tokens; [20] is dropped.
    assert packed(DOCS, tok_bos_eos, 4) == [
        [BOS, 10, 11, 12],
        [BOS, EOS, 13, 14],
        [BOS, EOS, 15, 16],
        [BOS, 17, 18, 19],
    ]


def test_prepend_bos_false_packs_the_plain_stream(tok_bos_eos):
    assert packed(DOCS, tok_bos_eos, 4, prepend_bos=False) == [
        [10, 11, 12, EOS],
        [13, 14, EOS, 15],
        [16, 17, 18, 19],
    ]


def test_eos_only_tokenizer_has_no_bos_by_default(tok_eos_only):
    assert packed(DOCS, tok_eos_only, 5) == [
        [10, 11, 12, EOS, 13],
        [14, EOS, 15, 16, 17],
    ]


def test_gpt2_style_uses_endoftext_as_both_bos_and_separator(tok_gpt2_style):
    assert packed(DOCS, tok_gpt2_style, 4) == [
        [ENDOFTEXT, 10, 11, 12],
        [ENDOFTEXT, ENDOFTEXT, 13, 14],
        [ENDOFTEXT, ENDOFTEXT, 15, 16],
        [ENDOFTEXT, 17, 18, 19],
    ]


def test_tokenizer_without_specials_concatenates_documents(tok_plain):
    assert packed(DOCS, tok_plain, 4) == [[10, 11, 12, 13], [14, 15, 16, 17]]


def test_no_separator_after_the_last_document(tok_bos_eos):
    # stream: 10 11 <eos> 12 13 -> one context and the remainder [12, 13]; a trailing <eos> would make a second.
    assert packed(["t10 t11", "t12 t13"], tok_bos_eos, 3, prepend_bos=False) == [[10, 11, EOS]]


def test_contexts_are_int64_of_length_ctx_len(tok_bos_eos):
    contexts = list(pack_tokens(DOCS, tok_bos_eos, 3))
    assert contexts and all(c.dtype == torch.int64 and c.shape == (3,) for c in contexts)


def test_too_short_stream_gives_no_context(tok_bos_eos):
    assert packed(["t10 t11"], tok_bos_eos, 4) == []


def test_batch_size_does_not_change_the_output(tok_bos_eos):
    # With one document per batch, contexts must still span batch boundaries exactly as with one big batch.
    assert packed(DOCS, tok_bos_eos, 4, docs_per_batch=1) == packed(DOCS, tok_bos_eos, 4, docs_per_batch=256)


@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("docs_per_batch", [1, 7, 256])
def test_every_stream_token_appears_once_in_order(tok_bos_eos, prepend_bos, docs_per_batch):
    rng = random.Random(0)
    docs = [" ".join(f"t{rng.randrange(10, 60)}" for _ in range(rng.randrange(1, 40))) for _ in range(300)]
    # The expected stream, built one document at a time with the tokenizer's plain encode (not the batched call).
    stream: list[int] = []
    for i, doc in enumerate(docs):
        stream += ([EOS] if i else []) + tok_bos_eos.encode(doc, add_special_tokens=False)
    ctx_len = 17
    body = ctx_len - 1 if prepend_bos else ctx_len

    contexts = packed(docs, tok_bos_eos, ctx_len, prepend_bos=prepend_bos, docs_per_batch=docs_per_batch)

    assert len(contexts) == len(stream) // body
    assert all(len(c) == ctx_len for c in contexts)
    assert all(PAD not in c for c in contexts)
    if prepend_bos:
        assert all(c[0] == BOS for c in contexts)
        contexts = [c[1:] for c in contexts]
    flat = [token for c in contexts for token in c]
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) < body  # only a partial context was dropped


def test_consumes_documents_lazily(tok_bos_eos):
    consumed = 0

    def many_docs():
        nonlocal consumed
        for _ in range(10_000):
            consumed += 1
            yield "t10 t11 t12 t13"

    contexts = pack_tokens(many_docs(), tok_bos_eos, 8, docs_per_batch=16)
    assert consumed == 0
    next(contexts)
    assert consumed <= 16


def test_python_docs_first_context_needs_only_one_batch(tok_bos_eos, python_docs, monkeypatch):
    from interplab.data import corpus

    consumed = 0

    def counting_pack(docs, *args, **kwargs):
        def counted():
            nonlocal consumed
            for doc in docs:
                consumed += 1
                yield doc

        return pack_tokens(counted(), *args, **kwargs)

    monkeypatch.setattr(corpus, "pack_tokens", counting_pack)
    first = next(iter_contexts("python-docs", tok_bos_eos, 64))
    assert first.shape == (64,) and first[0] == BOS
    assert 0 < consumed <= 256  # one batch of the default size, not the ~2,500 documents of the corpus


def test_long_documents_do_not_warn_about_model_max_length(tokenizer_factory, caplog):
    import transformers

    tokenizer = tokenizer_factory(bos="<bos>", eos="<eos>", model_max_length=4)
    long_doc = " ".join(["t10"] * 50)
    transformers.utils.logging.enable_propagation()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()  # other imports (e.g. sae_lens) may have silenced warnings
    try:
        with caplog.at_level(logging.WARNING):
            assert len(packed([long_doc], tokenizer, 8)) == 7
        assert "longer than the specified maximum" not in caplog.text
        # Check that this tokenizer does warn when called the ordinary way, so the assertion above can fail.
        with caplog.at_level(logging.WARNING):
            tokenizer([long_doc], add_special_tokens=False)
        assert "longer than the specified maximum" in caplog.text
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        transformers.utils.logging.disable_propagation()


@pytest.mark.parametrize("ctx_len", [1, 0, -3, 2.5])
def test_bad_ctx_len_is_a_user_error(tok_bos_eos, ctx_len):
    with pytest.raises(InterplabError, match="ctx_len .* at least 2"):
        pack_tokens(DOCS, tok_bos_eos, ctx_len)  # raised at the call, before iteration


def test_ctx_len_1_via_iter_contexts(tok_bos_eos, tmp_path):
    (tmp_path / "doc.txt").write_text("t10 t11 t12")
    with pytest.raises(InterplabError, match="ctx_len 1 is not valid"):
        iter_contexts(str(tmp_path / "doc.txt"), tok_bos_eos, 1, split="all")


def test_prepend_bos_without_bos_token_is_a_user_error(tok_eos_only):
    with pytest.raises(InterplabError, match="no BOS token"):
        pack_tokens(DOCS, tok_eos_only, 4, prepend_bos=True)


def test_bad_docs_per_batch_is_a_user_error(tok_bos_eos):
    with pytest.raises(InterplabError, match="docs_per_batch"):
        pack_tokens(DOCS, tok_bos_eos, 4, docs_per_batch=0)
