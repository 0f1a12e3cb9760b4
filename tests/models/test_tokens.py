"""The byte tokenizer of table-embedding models, decoded for dashboards and token tables."""

from __future__ import annotations

import pytest
import torch

from interplab.models.tokens import BOS_TEXT, ByteTokenizer, token_text


def test_decode_inverts_encoding_with_bos_shown():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok([text])["input_ids"][0]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([256, *ids, 256]) == f"{BOS_TEXT}{text}{BOS_TEXT}"
    assert tok.decode([256, *ids], skip_special_tokens=True) == text
    assert tok.decode(torch.tensor([256, 104, 105])) == "<bos>hi"  # tensors of ids work too


def test_partial_utf8_is_replaced_not_raised():
    tok = ByteTokenizer()
    e_acute = list("é".encode("utf-8"))  # two bytes
    assert tok.decode(e_acute[:1]) == "\ufffd"
    assert tok.decode([*e_acute[:1], 256, *e_acute]) == "\ufffd<bos>é"  # BOS splits the byte run
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([257])


def test_batch_decode_and_token_text():
    tok = ByteTokenizer()
    assert tok.batch_decode([[104, 105], [256], []], clean_up_tokenization_spaces=False) == ["hi", BOS_TEXT, ""]
    assert token_text(tok, 65) == "A" and token_text(tok, 256) == BOS_TEXT
    assert token_text(None, 65) == "#65"
