"""In-memory batch streams of the preference stages: epochs, rank split and arithmetic resume."""

from __future__ import annotations

import itertools

import pytest

from avatarforge.stages.common import epoch_batches


def take(n: int, **kw) -> list[list[int]]:
    return list(itertools.islice(epoch_batches(10, 3, seed=1, **kw), n))


def test_epochs_cover_items_without_repeats():
    batches = take(3, rank=0, world_size=1, start_batch=0)  # 10 // 3 = 3 batches per epoch
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)
    nxt = take(6, rank=0, world_size=1, start_batch=0)[3:]
    assert nxt != batches  # a fresh permutation each epoch


def test_resume_continues_exactly():
    full = take(8, rank=0, world_size=1, start_batch=0)
    assert take(3, rank=0, world_size=1, start_batch=5) == full[5:8]


def test_ranks_take_interleaved_global_batches():
    single = take(6, rank=0, world_size=1, start_batch=0)
    r0 = take(3, rank=0, world_size=2, start_batch=0)
    r1 = take(3, rank=1, world_size=2, start_batch=0)
    assert r0 == single[0::2] and r1 == single[1::2]
    assert take(2, rank=1, world_size=2, start_batch=1) == r1[1:3]


def test_too_few_items():
    with pytest.raises(ValueError, match="cannot fill"):
        next(epoch_batches(2, 3, seed=0, rank=0, world_size=1, start_batch=0))
