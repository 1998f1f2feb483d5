"""Deduplication by ``event_id`` within ``dedup_horizon`` of event time: the rule and its in-memory store.  Pure.

The rule (:class:`DedupRule`) is the same whatever the store: an event is a
duplicate if an accepted event had the same ``event_id`` and has not been
forgotten yet.  Accepted ids are grouped in buckets of event time
(:data:`BUCKET_MS`, one hour); a bucket is forgotten as a whole once the
watermark is ``dedup_horizon`` past its end.  So an id is remembered for at
least ``dedup_horizon`` after its event's ``ts`` (measured on the watermark)
and at most one bucket longer; and forgetting is deterministic, which replay
and the partition-count and arrival-order properties rely on.

Stores implement :class:`DedupStore`.  Lookups and inserts take a whole batch
(one poll of one partition), so a store on disk makes one round of native
calls per batch.  :class:`MemoryDedup` keeps everything in dicts: the pure
pipeline of the tests and short-horizon tools use it.  The worker's store on
disk is ``kpimon.agents.worker.dedup_store``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

BUCKET_MS = 3_600_000  # ids are forgotten one hour of event time at a time


class DedupRule:
    """Which bucket an id's event falls in, and which buckets a watermark has let go."""

    __slots__ = ("horizon",)

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon

    @staticmethod
    def bucket(ts: int) -> int:
        return ts // BUCKET_MS

    def first_kept(self, wm: int) -> int:
        """The oldest bucket still remembered at watermark ``wm``: bucket ``b`` is kept while
        ``(b + 1) * BUCKET_MS + horizon > wm``."""
        return (wm - self.horizon) // BUCKET_MS


class DedupStore(Protocol):
    """Where accepted event ids are remembered.  ``ids`` and ``ts`` are parallel sequences."""

    rule: DedupRule

    def seen(self, ids: Sequence[str]) -> list[bool]:
        """For each id, whether it is remembered (one batch of lookups)."""
        ...

    def add(self, ids: Sequence[str], ts: Sequence[int]) -> None:
        """Remember ids of accepted events (their ``ts`` pick the bucket)."""
        ...

    def expire(self, wm: int) -> None:
        """Forget the buckets the watermark ``wm`` let go (:meth:`DedupRule.first_kept`)."""
        ...

    def __len__(self) -> int:
        """How many ids are remembered."""
        ...


class MemoryDedup:
    """A :class:`DedupStore` in dicts: memory grows with the ids of the horizon (~100 B per id)."""

    def __init__(self, horizon: int) -> None:
        self.rule = DedupRule(horizon)
        self._ids: dict[str, int] = {}  # id -> bucket
        self._buckets: dict[int, list[str]] = {}
        self._oldest: int | None = None

    def seen(self, ids: Sequence[str]) -> list[bool]:
        known = self._ids
        return [i in known for i in ids]

    def add(self, ids: Sequence[str], ts: Sequence[int]) -> None:
        known = self._ids
        buckets = self._buckets
        for i, t in zip(ids, ts):
            b = t // BUCKET_MS
            known[i] = b
            lst = buckets.get(b)
            if lst is None:
                lst = buckets[b] = []
                if self._oldest is None or b < self._oldest:
                    self._oldest = b
            lst.append(i)

    def expire(self, wm: int) -> None:
        keep = self.rule.first_kept(wm)
        if self._oldest is None or self._oldest >= keep:
            return
        known = self._ids
        for b in [b for b in self._buckets if b < keep]:
            for i in self._buckets.pop(b):
                if known.get(i) == b:
                    del known[i]
        self._oldest = min(self._buckets, default=None)

    def __len__(self) -> int:
        return len(self._ids)

    def items(self) -> Iterator[tuple[str, int]]:
        """(id, bucket) of every remembered id (tests and tools)."""
        return iter(self._ids.items())


class NoDedup:
    """A :class:`DedupStore` that remembers nothing: for engines that only replay records already
    deduplicated (the serving layer's repair, :func:`~kpimon.agents.worker.recovery.replay_users`) and
    never decide on new events, so their memory does not grow with the ids of the horizon."""

    def __init__(self, horizon: int) -> None:
        self.rule = DedupRule(horizon)

    def seen(self, ids: Sequence[str]) -> list[bool]:
        return [False] * len(ids)

    def add(self, ids: Sequence[str], ts: Sequence[int]) -> None:
        pass

    def expire(self, wm: int) -> None:
        pass

    def __len__(self) -> int:
        return 0
