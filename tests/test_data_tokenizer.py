"""Tokenizers: bytes (default) and hashed words."""

from __future__ import annotations

import pytest
import torch

from avatarforge.data.config import DataConfig
from avatarforge.data.tokenizer import VOCAB_SIZE, decode_ids, encode_text, encode_words, tokenize, vocab_size


def test_ids_are_bytes_plus_one_with_padding() -> None:
    ids, mask = encode_text("ab", 5)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.tolist() == [98, 99, 0, 0, 0] and mask.tolist() == [True, True, False, False, False]


def test_truncation_utf8_and_round_trip() -> None:
    ids, mask = encode_text("héllo wörld", 4)
    assert ids.shape == (4,) and bool(mask.all())
    assert int(ids.max()) < VOCAB_SIZE
    ids, _ = encode_text("héllo wörld", 32)
    assert decode_ids(ids) == "héllo wörld"
    empty, empty_mask = encode_text("", 3)
    assert empty.tolist() == [0, 0, 0] and not bool(empty_mask.any())
    with pytest.raises(ValueError):
        encode_text("x", 0)


def test_a_word_is_one_id_wherever_it_stands() -> None:
    first, m1 = encode_words("In a BLUE room: a person", 8, 4096)
    last, m2 = encode_words("a person with short hair, in a blue room", 12, 4096)
    blue = int(first[2])
    assert int(last[8]) == blue and first[0] == last[6]  # 'blue' and 'in' wherever they stand, any case
    assert int(m1.sum()) == 7 and int(m2.sum()) == 10  # ':' and ',' are tokens too
    assert 0 < int(first[m1].min()) and int(last.max()) < 4096 and not bool(first[~m1].any())
    assert encode_words("one two three", 2, 64)[1].tolist() == [True, True]  # truncated at max_len tokens
    assert int(encode_words("blue", 1, 64)[0]) != int(encode_words("green", 1, 64)[0])
    with pytest.raises(ValueError):
        encode_words("x", 4, 1)


def test_tokenize_follows_the_data_config() -> None:
    words = DataConfig(tokenizer="words", word_ids=512, text_max_len=6)
    assert torch.equal(tokenize("a blue room", words)[0], encode_words("a blue room", 6, 512)[0])
    assert torch.equal(tokenize("a blue room", DataConfig(text_max_len=6))[0], encode_text("a blue room", 6)[0])
    assert vocab_size(words) == 512 and vocab_size(DataConfig()) == VOCAB_SIZE
    with pytest.raises(ValueError, match="data.tokenizer"):
        tokenize("x", DataConfig(tokenizer="chars"))
