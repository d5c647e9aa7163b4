"""Raw (undecoded) samples of one slot's shard visits, read with webdataset's tar stages.

Each visit yields exactly the number of samples its index entry promises: a truncated or unreadable
shard is padded with placeholder samples (counted as bad later) and surplus members are dropped. Sample
positions therefore depend only on the index, which is what makes seeking by arithmetic exact.
Identity reference records (members ref.*) do not occupy positions; clips carry them (see below).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import webdataset as wds

from .seeding import derive_seed
from .shards import ShardVisit

MISSING = "__missing__"  # set on placeholder samples, with the reason
REFERENCES = "__references__"  # set on every clip: {identity: raw reference record} seen so far in its shard
REFERENCE_MEMBER = "ref.json"  # a record with this member is an identity's reference, not a clip


def is_reference(sample: dict[str, Any]) -> bool:
    return any(k.startswith("ref.") for k in sample if not k.startswith("__"))


def _reference_identity(sample: dict[str, Any]) -> str | None:
    try:
        meta = json.loads(sample[REFERENCE_MEMBER])
        identity = meta.get("identity") if isinstance(meta, dict) else None
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
    return identity if isinstance(identity, str) else None


def _shard_members(url: str, count: int) -> Iterator[dict[str, Any]]:
    errors: list[str] = []

    def handler(exn: Exception) -> bool:
        # keep going: the shard's lost samples surface as placeholders below and are counted there
        errors.append(f"{type(exn).__name__}: {exn}"[:200])
        return True

    n = 0
    # Reference records (ahead of their identity's clips) are not stream positions: they are kept here
    # and every clip carries this shard's {identity: reference} dict (shared, never copied); the decoder
    # picks the clip's identity from it. Shuffling cannot separate a clip from its reference, since a
    # clip is read after its reference and the dict only grows.
    references: dict[str, dict[str, Any]] = {}
    for sample in wds.tarfile_to_samples(handler=handler)(iter([{"url": url}])):
        if is_reference(sample):
            identity = _reference_identity(sample)
            if identity is not None:
                references[identity] = sample
            continue
        if n == count:
            break
        n += 1
        sample[REFERENCES] = references
        yield sample
    for _ in range(n, count):
        reason = f"shard holds {n} of {count} indexed samples" + (f" ({errors[0]})" if errors else "")
        yield {"__key__": None, "__url__": url, MISSING: reason}


def visit_samples(
    visits: Iterable[ShardVisit], urls: Sequence[str], *, seed: int, shuffle_buffer: int
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: shard visits -> raw samples (bytes members, plus __url__ and __epoch__).

    The optional shuffle is per visit and seeded by (seed, epoch, shard), so a seek only replays the one
    shard it lands in, never the history of a cross-shard buffer.
    """
    for visit in visits:
        stream: Iterator[dict[str, Any]] = _shard_members(urls[visit.shard], visit.count)
        if shuffle_buffer > 1:
            shuffle_seed = derive_seed("visit-shuffle", seed, visit.epoch, visit.shard)
            stream = iter(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=shuffle_seed)(stream))
        for sample in islice(stream, visit.offset, None):
            sample["__epoch__"] = visit.epoch
            yield sample
