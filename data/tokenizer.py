"""Text tokenizers with no vocabulary file to ship.

- "bytes" (default): UTF-8 bytes, id = byte + 1; every string round-trips.
- "words": lower-cased words and punctuation marks, each hashed (crc32) to an id in [1, word_ids). A word is
  one token wherever it stands in a caption: a small encoder trained from scratch on a few dozen captions
  learns a word placed after a description of varying length this way, where from bytes it learns only a
  word at a fixed place (README, claim d: the caption's room word). Hash collisions merge rare words.

Both pad with id 0. `tokenize(text, data)` follows a DataConfig (tokenizer, text_max_len, word_ids).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import torch

PAD_ID = 0
VOCAB_SIZE = 257  # bytes: 256 byte values shifted by one, plus padding at 0
TOKENIZERS = ("bytes", "words")
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def encode_text(text: str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes -> (ids LongTensor[max_len], mask BoolTensor[max_len]); id = byte + 1, 0 = pad.

    Truncates at max_len bytes (a multi-byte character may be cut; the model sees bytes, not characters).
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    data = text.encode("utf-8")[:max_len]
    ids = torch.zeros(max_len, dtype=torch.long)
    mask = torch.zeros(max_len, dtype=torch.bool)
    if data:
        ids[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + 1
        mask[: len(data)] = True
    return ids, mask


def encode_words(text: str, max_len: int, word_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower-cased words and punctuation -> (ids LongTensor[max_len], mask BoolTensor[max_len]); each token's
    id is 1 + crc32(token) mod (word_ids - 1), 0 = pad. Truncates at max_len tokens."""
    if max_len <= 0 or word_ids < 2:
        raise ValueError(f"max_len must be positive and word_ids >= 2, got {max_len}, {word_ids}")
    words = _WORD.findall(text.lower())[:max_len]
    ids = torch.zeros(max_len, dtype=torch.long)
    mask = torch.zeros(max_len, dtype=torch.bool)
    if words:
        ids[: len(words)] = torch.tensor([1 + zlib.crc32(w.encode()) % (word_ids - 1) for w in words])
        mask[: len(words)] = True
    return ids, mask


def encode(text: str, max_len: int, tokenizer: str = "bytes", word_ids: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`text` by the named tokenizer: encode_text ("bytes") or encode_words ("words", word_ids ids)."""
    if tokenizer == "words":
        return encode_words(text, max_len, word_ids)
    if tokenizer != "bytes":
        raise ValueError(f"data.tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    return encode_text(text, max_len)


def tokenize(text: str, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`text` as the data config `data` (data.config.DataConfig) says: its tokenizer and text_max_len."""
    return encode(text, data.text_max_len, data.tokenizer, data.word_ids)


def vocab_size(data: Any) -> int:
    """The text encoder's vocabulary size the data config's tokenizer needs."""
    return data.word_ids if data.tokenizer == "words" else VOCAB_SIZE


def decode_ids(ids: torch.Tensor) -> str:
    """Inverse of encode_text (padding dropped); handy for logging captions of a batch (bytes only)."""
    data = bytes(int(i) - 1 for i in ids.tolist() if int(i) != PAD_ID)
    return data.decode("utf-8", errors="replace")
