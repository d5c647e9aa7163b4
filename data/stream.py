"""Raw (undecoded) samples of one slot's shard visits: tar members grouped into samples by webdataset.

Each visit yields exactly the number of samples its index entry promises: a truncated or unreadable
shard is padded with placeholder samples (counted as bad later) and surplus members are dropped. Sample
positions therefore depend only on the index, which is what makes seeking by arithmetic exact.
Identity reference records (members ref.*) do not occupy positions; clips carry them (see below).
A visit may select samples by key (the loader's identity filter, see selection.py): only those occupy
positions, and the index-side count of the selection is what the visit promises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import webdataset as wds
from pydantic_core import from_json
from webdataset.tariterators import group_by_keys

from .seeding import derive_seed
from .shards import ShardVisit
from .tar_reader import iter_members

MISSING = "__missing__"  # set on placeholder samples, with the reason
REFERENCES = "__references__"  # set on every clip: the raw reference records seen so far in its shard
REFERENCE_MEMBER = "ref.json"  # a record with this member is an identity's reference, not a clip
_IDENTITY = "__identity__"  # a reference record's identity, parsed from its ref.json on first lookup
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own skip rule for meta members
_BUFFER = 1 << 20


def is_reference(sample: dict[str, Any]) -> bool:
    return any(k.startswith("ref.") for k in sample if not k.startswith("__"))


def _not_reference_member(name: str) -> bool:
    """False for members of reference records (`<key>.ref.<ext>`, webdataset's key/suffix split)."""
    base = name.rsplit("/", 1)[-1]
    return not base.partition(".")[2].lower().startswith("ref.")


def reference_for(records: list[dict[str, Any]], identity: str) -> dict[str, Any] | None:
    """The latest of `records` (a clip's REFERENCES) whose ref.json names `identity`. Identities are parsed
    lazily, once per record, so that a stream that never looks a reference up never parses one."""
    for record in reversed(records):
        if _IDENTITY not in record:
            record[_IDENTITY] = _json_field(record.get(REFERENCE_MEMBER), "identity")
        if record[_IDENTITY] == identity:
            return record
    return None


def _json_field(data: Any, field: str) -> str | None:
    try:
        meta = from_json(data)
    except (TypeError, ValueError):
        return None
    value = meta.get(field) if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _tar_files(
    url: str, errors: list[str], want: Callable[[str], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """webdataset's file samples ({fname, data, __url__}) of one shard; a read error ends the shard and is
    recorded in `errors` (the shard's lost samples surface as placeholders, counted as bad)."""
    try:
        with wds.gopen(url, "rb", bufsize=_BUFFER) as stream:
            for name, data in iter_members(stream, want=want):
                if name.startswith("__") and _META.match(name):
                    continue
                yield {"fname": name, "data": data, "__url__": url}
    except Exception as exn:  # unreadable or foreign file, truncated member: keep going, count it later
        errors.append(f"{type(exn).__name__}: {exn}"[:200])


def _grouped(url: str, errors: list[str], want: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn}"[:200])
        return True

    return group_by_keys(_tar_files(url, errors, want), handler=handler)


def _shard_members(
    url: str, count: int, keys: frozenset[str] | None = None, references: bool = True
) -> Iterator[dict[str, Any]]:
    """The visit's samples; references=False leaves reference records unread (their bytes are skipped)."""
    errors: list[str] = []
    n = 0
    # Reference records (ahead of their identity's clips) are not stream positions: they are kept here
    # and every clip carries this shard's list of them (shared, never copied); the decoder picks the
    # clip's identity's record (reference_for). Shuffling cannot separate a clip from its reference,
    # since a clip is read after its reference and the list only grows.
    records: list[dict[str, Any]] = []
    for sample in _grouped(url, errors, None if references else _not_reference_member):
        if is_reference(sample):
            records.append(sample)
            continue
        if keys is not None and sample["__key__"] not in keys:
            continue
        if n == count:
            break
        n += 1
        sample[REFERENCES] = records
        yield sample
    for _ in range(n, count):
        reason = f"shard holds {n} of {count} indexed samples" + (f" ({errors[0]})" if errors else "")
        yield {"__key__": None, "__url__": url, MISSING: reason}


def clip_identities(url: str) -> list[tuple[str, str | None]]:
    """(key, identity from its json) of every clip in a shard, in tar order, reading only json members;
    identity is None where the json is missing or unreadable."""
    errors: list[str] = []
    out = []
    for sample in _grouped(url, errors, want=lambda name: name.endswith(".json")):
        if not is_reference(sample):
            out.append((sample["__key__"], _json_field(sample.get("json"), "identity")))
    return out


def visit_samples(
    visits: Iterable[ShardVisit],
    urls: Sequence[str],
    *,
    seed: int,
    shuffle_buffer: int,
    keys: Sequence[frozenset[str] | None] | None = None,
    references: bool = True,
) -> Iterator[dict[str, Any]]:
    """Pipeline stage: shard visits -> raw samples (bytes members, plus __url__ and __epoch__).

    keys[shard], when given and not None, selects that shard's samples by key (in tar order);
    references=False skips reading identity reference records (a loader that attaches none).
    The optional shuffle is per visit and seeded by (seed, epoch, shard), so a seek only replays the one
    shard it lands in, never the history of a cross-shard buffer.
    """
    for visit in visits:
        selected = keys[visit.shard] if keys is not None else None
        stream: Iterator[dict[str, Any]] = _shard_members(urls[visit.shard], visit.count, selected, references)
        if shuffle_buffer > 1:
            shuffle_seed = derive_seed("visit-shuffle", seed, visit.epoch, visit.shard)
            stream = iter(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=shuffle_seed)(stream))
        for sample in islice(stream, visit.offset, None):
            sample["__epoch__"] = visit.epoch
            yield sample
