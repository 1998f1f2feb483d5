"""The aggregation and the ledger survive a crash at any point: every period is published with the same
numbers as without the crash, and every snapshot version with the same bytes.

The faust agent backs the Aggregator's mappings with Tables, each with its own
changelog.  A worker killed at any moment leaves, on each changelog, a prefix
of the writes made since the last offset commit -- independently of the
others -- and the agent re-reads the partials topic from that commit.  This
test plays every such crash on a stream where one partition runs far ahead
(its partials of a day arrive long before the lagging partition closes it) and
checks the latest value of every period published, as a reader of
``kpimon.periods`` keeps it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest

from kpimon.agents.core.aggregate import Aggregator, Prefixed
from kpimon.agents.core.ledger import Book, canonical
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.agents.core.periods import Calendar
from kpimon.agents.core.step import close_step
from kpimon.streams.events import PURCHASE, Event
from kpimon.streams.topics import ClosedPeriod, Partial, Progress

DAY = 86_400_000
T0 = 1_704_067_200_000
GONE = object()


class Recorded(MutableMapping):
    """A dict whose writes are logged, as a Table's changelog would carry them."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.data = name, log, {}

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.log.append((self.name, key, value))

    def __delitem__(self, key: str) -> None:
        del self.data[key]
        self.log.append((self.name, key, GONE))

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def _metrics(n: int) -> dict:
    m = PeriodMetrics()
    m.active_users = n
    return m.to_wire()


def _stream(days: int) -> list[Partial | Progress]:
    """Partition 0 runs through every day first; partition 1 follows (each day: its partial, then progress)."""
    out: list[Partial | Progress] = []
    for p in (0, 1):
        for d in range(days):
            start = T0 + d * DAY
            out.append(Partial(p, 2, "day", f"2024-01-0{d + 1}", start, start + DAY, _metrics(10 * (p + 1) + d)))
            out.append(Progress(p, 2, start + DAY, {"accepted": d}, None))
            if p == 0 and d == 0:
                # A late purchase of day 1 before day 1 closes: it waits, and becomes version 2 at the close.
                out.append([Event(start + DAY + 5, "late-1", "u1", PURCHASE, "purchase", 500, None, None)])
    # Another, once every day is closed: version 3 of day 1, built on version 2.
    out.append([Event(T0 + DAY + 7, "late-2", "u1", PURCHASE, "purchase", 300, None, None)])
    return out


def _book(agg: Aggregator) -> Book:
    """The ledger as the worker builds it: its versions and pending events in the aggregation's state."""
    state = agg.state
    return Book(Prefixed(state, "ledger/"), Prefixed(state, "pending/"), calendar=Calendar("UTC"),
                warning_state="sleeping", decimals=2, config_version={"settings": "x"})


def _run(agg: Aggregator, msgs: list, published: list, writes_after: list | None = None,
         log: list | None = None) -> None:
    """The aggregate agent's step for each message (agents/worker/app.py), publishing to ``published``."""
    book = _book(agg)
    for msg in msgs:
        if isinstance(msg, list):  # late events (the restate agent)
            tx = book.on_late(msg)
            published.extend(tx.snapshots)
            book.commit(tx)
        else:
            step = close_step(agg, msg)
            for out in step.publish:  # published before they are marked (the agent awaits each send)
                published.append(out)
                if isinstance(out, ClosedPeriod):
                    tx = book.on_closed(out.grain, out.period, out.start, out.end,
                                        PeriodMetrics.from_wire(out.metrics))
                    published.extend(tx.snapshots)
                    book.commit(tx)
            agg.mark_published(step.mark)
        if writes_after is not None and log is not None:
            writes_after.append(len(log))


def _snapshots(published: list) -> dict:
    """Every snapshot version published, by key: a version published twice must be the same bytes."""
    out: dict = {}
    for s in published:
        if isinstance(s, dict):
            key = (s["grain"], s["period"], s["version"])
            assert out.setdefault(key, canonical(s)) == canonical(s), key
    return out


def _latest(published: list) -> dict:
    return {f"{c.grain}/{c.period}": c.metrics for c in published if isinstance(c, ClosedPeriod)}


def _tables(log: list, names=("partials", "progress", "closed")) -> dict[str, dict]:
    tables: dict[str, dict] = {n: {} for n in names}
    for name, key, value in log:
        if value is GONE:
            tables[name].pop(key, None)
        else:
            tables[name][key] = value
    return tables


@pytest.mark.parametrize("seed", range(4))
def test_a_crash_anywhere_publishes_every_period_with_its_reference_numbers(seed) -> None:
    msgs = _stream(3)
    reference: list = []
    _run(Aggregator({}, {}, {}), msgs, reference)
    want = _latest(reference)
    assert len(want) == 3 and all(v["active_users"] for v in want.values())
    want_snapshots = _snapshots(reference)
    assert {("day", "2024-01-02", 2), ("day", "2024-01-02", 3)} <= set(want_snapshots)  # restatements of day 1

    # One uninterrupted run, recording every changelog write and where each message's writes end.
    log: list = []
    ends: list[int] = []
    _run(Aggregator(Recorded("partials", log), Recorded("progress", log), Recorded("closed", log)), msgs, [],
         ends, log)
    rnd = random.Random(seed)
    tried = 0
    for c in range(len(msgs) + 1):  # the committed offset: messages before it are done and durable
        durable = ends[c - 1] if c else 0
        for k in range(c, len(msgs) + 1):  # the crash: messages before it were processed and published
            after = log[durable:ends[k - 1]] if k else []
            per_table = {n: [w for w in after if w[0] == n] for n in ("partials", "progress", "closed")}
            # Each changelog keeps its own prefix of the writes made after the commit: every combination
            # when there are few, else a sample.
            cuts = list(itertools.product(*(range(len(ws) + 1) for ws in per_table.values())))
            if len(cuts) > 60:
                cuts = rnd.sample(cuts, 60)
            for cut in cuts:
                kept = [w for n, ws in zip(per_table, per_table.values()) for w in ws[:cut[list(per_table).index(n)]]]
                kept.sort(key=after.index)
                published: list = []
                _run(Aggregator({}, {}, {}), msgs[:k], published)  # what left before the crash
                tables = _tables(log[:durable] + kept)
                restarted = Aggregator(tables["partials"], tables["progress"], tables["closed"])
                _run(restarted, msgs[c:], published)  # the agent re-reads from the committed offset
                assert _latest(published) == want, (c, k, kept)
                assert _snapshots(published) == want_snapshots, (c, k, kept)
                tried += 1
    assert tried > 500
