"""The train loader's identity filter: the shards, and the samples in them, of chosen identities.

The index lists each shard's identities (shards are grouped by identity). A shard holding only chosen
identities is taken whole; a shard that mixes chosen and other identities is scanned once, reading only
its json members, for the keys of the chosen identities' clips. The result is a smaller dataset with exact
per-shard sample counts, so the stream seeks by arithmetic over it just as over the whole split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .stream import clip_identities


@dataclass(frozen=True)
class Selection:
    urls: tuple[str, ...]
    counts: tuple[int, ...]  # samples of each selected shard that the stream reads
    keys: tuple[frozenset[str] | None, ...]  # the shard's selected sample keys; None: all of its samples


def whole_split(urls: Sequence[str], counts: Sequence[int]) -> Selection:
    """Every sample; empty shards are dropped (they hold no stream positions)."""
    kept = [(url, n) for url, n in zip(urls, counts, strict=True) if n > 0]
    return Selection(tuple(u for u, _ in kept), tuple(n for _, n in kept), (None,) * len(kept))


def select_identities(index: dict[str, Any], urls: Sequence[str], identities: Iterable[str]) -> Selection:
    """The samples of `identities` (in shard order). Raises ValueError naming any identity without samples.

    A clip whose json cannot be read has no known identity and is left out of a mixed shard (unfiltered,
    it would be a counted bad sample).
    """
    chosen = set(identities)
    if not chosen:
        raise ValueError("the identity filter is empty")
    listed = index.get("shard_identities")
    if not isinstance(listed, list) or len(listed) != len(urls):
        listed = [None] * len(urls)  # an index without per-shard identities: scan every shard
    found: Counter[str] = Counter()
    rows: list[tuple[str, int, frozenset[str] | None]] = []
    for url, n, names in zip(urls, index["counts"], listed, strict=True):
        names = set(names) if names is not None else None
        if n <= 0 or (names is not None and not names & chosen):
            continue
        if names is not None and names <= chosen:
            # whole shard: per-identity counts are not in the index, but any one sample proves presence
            rows.append((url, n, None))
            found.update(names)
            continue
        clips = clip_identities(url)[:n]  # the stream reads at most the index's count of clips
        mine = [(key, ident) for key, ident in clips if ident in chosen]
        if mine:
            rows.append((url, len(mine), frozenset(k for k, _ in mine)))
            found.update(ident for _, ident in mine)
    missing = sorted(chosen - set(found))
    if missing:
        known = index.get("identities") or []
        raise ValueError(
            f"identities {missing} have no samples in split {index.get('split', '?')!r} "
            f"({len(known)} identities there: {', '.join(map(str, known[:8]))}{' ...' if len(known) > 8 else ''})"
        )
    return Selection(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))
