"""Byte-level text tokenizer: no vocabulary file to ship, every string round-trips."""

from __future__ import annotations

import torch

PAD_ID = 0
VOCAB_SIZE = 257  # 256 byte values shifted by one, plus padding at 0


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


def decode_ids(ids: torch.Tensor) -> str:
    """Inverse of encode_text (padding dropped); handy for logging captions of a batch."""
    data = bytes(int(i) - 1 for i in ids.tolist() if int(i) != PAD_ID)
    return data.decode("utf-8", errors="replace")
