"""Bad-sample accounting: skip and count, and fail loudly (naming shards) past a configured share."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MIN_SEEN_BEFORE_FAILING = 20  # a single early bad sample must not look like a 100% failure rate


@dataclass
class SampleHealth:
    max_bad_fraction: float
    seen: int = 0
    bad: int = 0
    bad_by_shard: Counter[str] = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)

    def ok(self) -> None:
        self.seen += 1

    def failed(self, shard: str, key: str | None, reason: str) -> None:
        """Record one bad sample; raises RuntimeError once the bad share passes max_bad_fraction."""
        self.seen += 1
        self.bad += 1
        self.bad_by_shard[shard] += 1
        self.first_error.setdefault(shard, f"{key or '?'}: {reason}"[:300])
        if self.seen >= MIN_SEEN_BEFORE_FAILING and self.bad > self.max_bad_fraction * self.seen:
            raise RuntimeError(self.report())

    def report(self) -> str:
        shards = "\n".join(
            f"  {shard}: {n} bad, first: {self.first_error[shard]}"
            for shard, n in self.bad_by_shard.most_common()
        )
        return (
            f"{self.bad} of {self.seen} samples were bad ({self.bad / max(1, self.seen):.1%}), over "
            f"max_bad_fraction={self.max_bad_fraction}; offending shards:\n{shards}"
        )
