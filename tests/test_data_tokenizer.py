"""Byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from avatarforge.data.tokenizer import VOCAB_SIZE, decode_ids, encode_text


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
