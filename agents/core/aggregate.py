"""Cross-partition aggregation of closed periods.  Pure.

Each partition engine publishes, in order on one single-partition topic, the
numbers of every period it closes (``Partial``) and then its watermark
(``Progress``).  A period is closed globally once *every* partition's
watermark has reached its end; its numbers are the sum of the partitions'
partials (a partition with no partial contributed nothing).  Users are
partitioned by key, so distinct-user counts add up exactly.

State lives in one mapping so that the faust agent can back it with a
changelogged Table and tests can use a dict.  Every update is idempotent: a
partial or progress message delivered twice changes nothing.

Crash consistency: a worker killed mid-way leaves on a changelog a prefix of
the writes made since the agent's last offset commit, and the agent re-reads
the partials topic from that commit.  Each Table has its own changelog, and
the prefixes of two changelogs are independent, so *every* write goes to one
mapping (one single-partition changelog, in order): a crash then leaves the
state some prefix of the processing produced, from which re-reading gives
the same periods.  With the partitions' progress in a Table apart, a crash
could keep a lagging partition's progress and lose its partial of the day it
just closed; re-reading the other partition's later progress would then close
that day without it.  (tests/unit/core/test_aggregate_crash.py plays every
such crash.)  Keys: ``<grain>/<label>`` -> a period's partials
``{"meta": [...], "parts": {partition: wire}}``, or ``{"closed": end}`` once
published; ``progress/<partition>`` -> ``{"watermark", "partitions",
"totals"}``; ``progress/global`` -> the last watermark notice.  ``progress``
and ``closed`` are read only: deployments of earlier versions kept their
partitions' progress and closed keys in Tables of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

from kpimon.agents.core.metrics import PeriodMetrics, merge_all
from kpimon.streams.topics import ClosedPeriod, GlobalWatermark, Partial, Progress

LIVE_TTL_S = 30.0  # open-period reports older than this are ignored (the partition moved away)


class Aggregator:
    def __init__(self, state: MutableMapping[str, Any], progress: Mapping[str, Any] | None = None,
                 closed: Mapping[str, Any] | None = None, notice_every_ms: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notice_every_ms = notice_every_ms
        self._clock = clock
        self.state = state  # every write (see the module docstring)
        self.legacy_progress = progress if progress is not None else {}  # str(partition) -> progress (read only)
        self.closed = closed if closed is not None else {}  # "grain/label" -> end_ms (read only)
        # partition -> (received at, its open periods), in memory only: live KPIs
        self.live: dict[int, tuple[float, list]] = {}

    def progress_of(self, key: str) -> dict | None:
        """A partition's progress (``key``: its number as a string), or the last notice (``"global"``)."""
        got = self.state.get(f"progress/{key}")
        return got if got is not None else self.legacy_progress.get(key)

    def partition_count(self) -> int:
        """The partition count the partitions report (0 before partition 0 has reported: no global watermark
        exists before every partition has)."""
        first = self.progress_of("0")
        return int(first.get("partitions", 0)) if first is not None else 0

    def on_partial(self, msg: Partial) -> None:
        key = f"{msg.grain}/{msg.period}"
        entry = self.state.get(key)
        if (entry is not None and "closed" in entry) or key in self.closed:
            return  # never re-emitted
        entry = entry or {"meta": [msg.grain, msg.period, msg.start, msg.end], "parts": {}}
        parts = dict(entry["parts"])
        parts[str(msg.partition)] = msg.metrics
        self.state[key] = {"meta": entry["meta"], "parts": parts}

    def on_progress(self, msg: Progress) -> list[ClosedPeriod | GlobalWatermark]:
        """Record a partition's watermark; return what is now closed (not yet marked).

        The caller publishes the returned messages and *then* calls
        :meth:`mark_published`: a crash in between re-emits them (consumers
        keep the latest per key) instead of losing them.
        """
        prev = self.progress_of(str(msg.partition))
        if prev is not None and prev["watermark"] > msg.watermark:
            return []  # an older message delivered again
        self.state[f"progress/{msg.partition}"] = {"watermark": msg.watermark, "partitions": msg.partitions,
                                             "totals": msg.totals}
        if msg.open is not None:
            self.live[msg.partition] = (self._clock(), msg.open)
        wm = self.global_watermark(msg.partitions)
        if wm is None:
            return []
        out: list[ClosedPeriod | GlobalWatermark] = []
        ready = sorted(
            (entry["meta"][3], entry["meta"][2], key)
            for key, entry in list(self.state.items())
            if "meta" in entry and entry["meta"][3] <= wm and key not in self.closed
        )
        for end, start, key in ready:
            entry = self.state[key]
            grain, label = entry["meta"][0], entry["meta"][1]
            merged = merge_all([PeriodMetrics.from_wire(w) for _, w in sorted(entry["parts"].items())])
            out.append(ClosedPeriod(grain, label, start, end, msg.partitions, merged.to_wire()))
        last = self.progress_of("global") or {"watermark": None}
        # A watermark notice when periods closed or it moved (by notice_every_ms: live ticks come
        # every second, publishing each would flood kpimon.periods).
        if out or last["watermark"] is None or (wm > last["watermark"]
                                                and wm - last["watermark"] >= self.notice_every_ms):
            out.append(GlobalWatermark(wm, msg.partitions, self.totals(msg.partitions)))
        return out

    def mark_published(self, published: list[ClosedPeriod | GlobalWatermark]) -> list[ClosedPeriod]:
        """Mark published periods closed; returns the non-empty ones worth reporting."""
        for item in published:
            if isinstance(item, ClosedPeriod):
                # One write: the period's partials give way to its closed marker (see the module docstring).
                self.state[f"{item.grain}/{item.period}"] = {"closed": item.end}
            else:
                self.state["progress/global"] = {"watermark": item.watermark}
        return [item for item in published if isinstance(item, ClosedPeriod)]

    @staticmethod
    def reportable(item: ClosedPeriod | GlobalWatermark) -> bool:
        """Periods before any data (all zero) are not published."""
        return not (isinstance(item, ClosedPeriod) and PeriodMetrics.from_wire(item.metrics).is_empty())

    def has_live(self) -> bool:
        """Whether this aggregator receives partitions' open-period reports (it runs the aggregation)."""
        fresh = self._clock() - LIVE_TTL_S
        return any(received >= fresh for received, _ in self.live.values())

    def live_view(self) -> dict[str, tuple[str, int, int, PeriodMetrics]]:
        """grain -> (label, start, end, metrics so far) of the latest open period, over all partitions.

        Partitions report their open periods every few seconds; a partition whose
        latest report is for an older period contributes nothing to the newer one.
        """
        out: dict[str, tuple[str, int, int, PeriodMetrics]] = {}
        fresh = self._clock() - LIVE_TTL_S
        for received, periods in self.live.values():
            if received < fresh:
                continue  # this worker no longer receives that partition's reports
            for op in periods:
                cur = out.get(op.grain)
                m = PeriodMetrics.from_wire(op.metrics)
                if cur is None or op.start > cur[1]:
                    out[op.grain] = (op.period, op.start, op.end, m)
                elif op.start == cur[1]:
                    out[op.grain] = (op.period, op.start, op.end, cur[3].merge(m))
        return out

    def global_watermark(self, partitions: int) -> int | None:
        marks = []
        for p in range(partitions):
            prog = self.progress_of(str(p))
            if prog is None:
                return None
            marks.append(prog["watermark"])
        return min(marks)

    def totals(self, partitions: int) -> dict[str, Any]:
        acc: dict[str, Any] = {"accepted": 0, "rejected": 0, "duplicates": 0, "late": 0, "rejected_by_reason": {}}
        for p in range(partitions):
            t = (self.progress_of(str(p)) or {}).get("totals") or {}
            acc["accepted"] += t.get("accepted", 0)
            acc["duplicates"] += t.get("duplicates", 0)
            acc["late"] += t.get("late", 0)
            for reason, n in (t.get("rejected") or {}).items():
                acc["rejected"] += n
                acc["rejected_by_reason"][reason] = acc["rejected_by_reason"].get(reason, 0) + n
        return acc


class Prefixed(MutableMapping):
    """The keys of ``base`` under ``prefix``, as a mapping of their own: the ledger keeps its versions and
    pending late events in the aggregation's state (one changelog for every write of the aggregation,
    see the module docstring).  ``legacy`` is read for keys not written here yet (what an earlier version
    kept in a Table of its own); deleting such a key leaves a marker that hides it."""

    GONE = {"gone": True}

    def __init__(self, base: MutableMapping[str, Any], prefix: str, legacy: Mapping[str, Any] | None = None) -> None:
        self.base, self.prefix, self.legacy = base, prefix, legacy

    def __getitem__(self, key: str) -> Any:
        value = self.base.get(self.prefix + key)
        if value is None and self.legacy is not None:
            value = self.legacy.get(key)
        if value is None or value == self.GONE:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.base[self.prefix + key] = value

    def __delitem__(self, key: str) -> None:
        self[key]  # KeyError if absent
        if self.legacy is not None and self.legacy.get(key) is not None:
            self.base[self.prefix + key] = self.GONE
        else:
            del self.base[self.prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self.prefix)
        mine = {k[n:]: v for k, v in list(self.base.items()) if k.startswith(self.prefix)}
        keys = [k for k, v in mine.items() if v is not None and v != self.GONE]
        if self.legacy is not None:
            keys += [k for k in self.legacy if k not in mine]
        return iter(keys)

    def __len__(self) -> int:
        return sum(1 for _ in self)
