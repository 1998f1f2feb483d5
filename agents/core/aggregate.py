"""Cross-partition aggregation of closed periods.  Pure.

Each partition engine publishes, in order on one single-partition topic, the
numbers of every period it closes (``Partial``) and then its watermark
(``Progress``).  A period is closed globally once *every* partition's
watermark has reached its end; its numbers are the sum of the partitions'
partials (a partition with no partial contributed nothing).  Users are
partitioned by key, so distinct-user counts add up exactly.

State lives in three mappings so that the faust agent can back them with
changelogged Tables and tests can use dicts.  Every update is idempotent: a
partial or progress message delivered twice changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Any

from kpimon.agents.core.metrics import PeriodMetrics, merge_all
from kpimon.streams.topics import ClosedPeriod, GlobalWatermark, Partial, Progress

LIVE_TTL_S = 30.0  # open-period reports older than this are ignored (the partition moved away)


class Aggregator:
    def __init__(self, partials: MutableMapping[str, Any], progress: MutableMapping[str, Any],
                 closed: MutableMapping[str, Any], notice_every_ms: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.notice_every_ms = notice_every_ms
        self._clock = clock
        self.partials = partials  # "grain/label" -> {"meta": [...], "parts": {partition: wire}}
        self.progress = progress  # str(partition) -> {"watermark", "partitions", "totals"}
        self.closed = closed  # "grain/label" -> end_ms (closed keys, never re-emitted)
        # partition -> (received at, its open periods), in memory only: live KPIs
        self.live: dict[int, tuple[float, list]] = {}

    def on_partial(self, msg: Partial) -> None:
        key = f"{msg.grain}/{msg.period}"
        if key in self.closed:
            return
        entry = self.partials.get(key) or {"meta": [msg.grain, msg.period, msg.start, msg.end], "parts": {}}
        parts = dict(entry["parts"])
        parts[str(msg.partition)] = msg.metrics
        self.partials[key] = {"meta": entry["meta"], "parts": parts}

    def on_progress(self, msg: Progress) -> list[ClosedPeriod | GlobalWatermark]:
        """Record a partition's watermark; return what is now closed (not yet marked).

        The caller publishes the returned messages and *then* calls
        :meth:`mark_published`: a crash in between re-emits them (consumers
        keep the latest per key) instead of losing them.
        """
        prev = self.progress.get(str(msg.partition))
        if prev is not None and prev["watermark"] > msg.watermark:
            return []  # an older message delivered again
        self.progress[str(msg.partition)] = {"watermark": msg.watermark, "partitions": msg.partitions,
                                             "totals": msg.totals}
        if msg.open is not None:
            self.live[msg.partition] = (self._clock(), msg.open)
        wm = self.global_watermark(msg.partitions)
        if wm is None:
            return []
        out: list[ClosedPeriod | GlobalWatermark] = []
        ready = sorted(
            (entry["meta"][3], entry["meta"][2], key)
            for key, entry in list(self.partials.items())
            if entry["meta"][3] <= wm
        )
        for end, start, key in ready:
            entry = self.partials[key]
            grain, label = entry["meta"][0], entry["meta"][1]
            merged = merge_all([PeriodMetrics.from_wire(w) for _, w in sorted(entry["parts"].items())])
            out.append(ClosedPeriod(grain, label, start, end, msg.partitions, merged.to_wire()))
        last = self.progress.get("global") or {"watermark": None}
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
                key = f"{item.grain}/{item.period}"
                self.closed[key] = item.end
                self.partials.pop(key, None)
            else:
                self.progress["global"] = {"watermark": item.watermark}
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
            prog = self.progress.get(str(p))
            if prog is None:
                return None
            marks.append(prog["watermark"])
        return min(marks)

    def totals(self, partitions: int) -> dict[str, Any]:
        acc: dict[str, Any] = {"accepted": 0, "rejected": 0, "duplicates": 0, "late": 0, "rejected_by_reason": {}}
        for p in range(partitions):
            t = (self.progress.get(str(p)) or {}).get("totals") or {}
            acc["accepted"] += t.get("accepted", 0)
            acc["duplicates"] += t.get("duplicates", 0)
            acc["late"] += t.get("late", 0)
            for reason, n in (t.get("rejected") or {}).items():
                acc["rejected"] += n
                acc["rejected_by_reason"][reason] = acc["rejected_by_reason"].get(reason, 0) + n
        return acc
