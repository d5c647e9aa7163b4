"""Stable seeds derived from structured parts (seed, epoch, key, ...)."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from parts; stable across processes and runs (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng_for(*parts: object) -> np.random.Generator:
    """A numpy Generator whose stream depends only on the given parts."""
    return np.random.default_rng(derive_seed(*parts))
