"""Deterministic shard assignment for (rank, worker) slots, and cheap seeking by sample position.

Every slot reads an infinite stream: epoch e is a seeded permutation of all shards, dealt round-robin to
slots. Because the index knows each shard's sample count, skipping N samples is arithmetic over the
shard sequence; only the shard holding sample N is opened.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .seeding import derive_seed


@dataclass(frozen=True)
class ShardVisit:
    epoch: int
    shard: int  # position in the index's shard list
    count: int  # samples the index promises for this shard
    offset: int  # samples of this visit already consumed (non-zero only for the first visit after a seek)


def slot_shards(n_shards: int, *, seed: int, epoch: int, slot: int, n_slots: int) -> list[int]:
    """This slot's shards for one epoch.

    With fewer shards than slots a slot still gets one (perm[slot % n]), so no rank ever starves:
    streams stay infinite and a fixed step count cannot leave one rank waiting in a collective.
    """
    if n_shards <= 0:
        raise ValueError("no shards to read")
    perm = np.random.default_rng(derive_seed("shard-order", seed, epoch)).permutation(n_shards)
    mine = perm[slot::n_slots]
    return [int(s) for s in mine] if len(mine) else [int(perm[slot % n_shards])]


def slot_visits(
    counts: Sequence[int], *, seed: int, slot: int, n_slots: int, skip: int = 0
) -> Iterator[ShardVisit]:
    """Infinite shard visits for a slot, starting at the sample position `skip` of its stream."""
    if not counts or min(counts) <= 0:
        raise ValueError("every shard must hold at least one sample")
    epoch = 0
    while True:
        shards = slot_shards(len(counts), seed=seed, epoch=epoch, slot=slot, n_slots=n_slots)
        total = sum(counts[s] for s in shards)
        if skip >= total:  # whole epoch already consumed: no file is touched
            skip -= total
        else:
            for shard in shards:
                if skip >= counts[shard]:
                    skip -= counts[shard]
                    continue
                yield ShardVisit(epoch=epoch, shard=shard, count=counts[shard], offset=skip)
                skip = 0
        epoch += 1
