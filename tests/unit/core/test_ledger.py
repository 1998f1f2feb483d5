"""The period-close ledger: canonical snapshots, hashes, restatements."""

from __future__ import annotations

import orjson

from kpimon.agents.core.ledger import Book, canonical, content_hash
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.agents.core.periods import Calendar
from kpimon.streams.events import Decoder

JAN1 = 1_704_067_200_000
FEB1 = 1_706_745_600_000
CFG = {"settings": "abc", "kpis": "def"}


def month(orders: int = 3, revenue: int = 5997) -> PeriodMetrics:
    m = PeriodMetrics()
    m.orders, m.revenue, m.active_users = orders, revenue, 2
    return m


class Committing(Book):
    """Publishes instantly: every call commits (the worker commits after publishing)."""

    def on_closed(self, *args):
        tx = super().on_closed(*args)
        self.commit(tx)
        return tx.snapshots

    def on_late(self, events):
        tx = super().on_late(events)
        self.commit(tx)
        return tx.snapshots


def book() -> Book:
    return Committing({}, {}, calendar=Calendar("UTC"), warning_state="sleeping", decimals=2, config_version=CFG)


def event(eid: str, typ: str, ts: int, amount: str | None = None):
    body = {"event_id": eid, "user_id": "u1", "type": typ, "ts": ts}
    if amount is not None:
        body["amount"] = amount
    return Decoder().decode(orjson.dumps(body))


def test_version_one_is_canonical_and_hashed_and_reproducible():
    a = book().on_closed("month", "2024-01", JAN1, FEB1, month())
    b = book().on_closed("month", "2024-01", JAN1, FEB1, month())
    assert len(a) == 1
    snap = a[0]
    assert canonical(snap) == canonical(b[0])  # byte-identical for the same input and config
    assert snap["hash"] == content_hash(snap)
    assert snap["version"] == 1 and snap["config_version"] == CFG
    assert snap["metrics"]["revenue"] == "59.97"
    assert snap["start"] == "2024-01-01T00:00:00+00:00" and snap["end"] == "2024-02-01T00:00:00+00:00"


def test_a_late_purchase_after_close_is_version_two_with_the_delta_and_version_one_stays():
    b = book()
    v1 = b.on_closed("month", "2024-01", JAN1, FEB1, month())[0]
    v1_bytes = canonical(v1)
    out = b.on_late([event("late-1", "purchase", JAN1 + 1000, "19.99"), event("late-2", "login", JAN1 + 2000)])
    v2 = [s for s in out if s["grain"] == "month"]
    assert len(v2) == 1
    v2 = v2[0]
    assert v2["version"] == 2
    assert v2["delta"] == {"orders": 1, "revenue": "+19.99"}
    assert v2["late_events"] == 1  # the login restates nothing
    assert v2["metrics"]["orders"] == 4 and v2["metrics"]["revenue"] == "79.96"
    assert canonical(v1) == v1_bytes and v2["hash"] != v1["hash"]
    # The same late event delivered again restates nothing.
    assert b.on_late([event("late-1", "purchase", JAN1 + 1000, "19.99")]) == []


def test_late_events_for_a_period_not_closed_yet_wait_for_version_one():
    b = book()
    assert b.on_late([event("r1", "refund", JAN1 + 5, "5.00")]) == []
    out = b.on_closed("month", "2024-01", JAN1, FEB1, month())
    assert [s["version"] for s in out] == [1, 2]
    assert out[1]["delta"] == {"revenue": "-5.00", "refunds": "+5.00"}


def test_previous_period_is_available_to_formulas():
    seen = {}

    def evaluate(grain, label, start, end, result, prev):
        seen[label] = prev
        return [], []

    b = Committing({}, {}, calendar=Calendar("UTC"), warning_state="sleeping", decimals=2, config_version=CFG,
                   evaluate=evaluate)
    b.on_closed("month", "2024-01", JAN1, FEB1, month())
    b.on_closed("month", "2024-02", FEB1, 1_709_251_200_000, month(orders=1))
    assert seen["2024-01"] is None
    assert seen["2024-02"]["orders"] == 3


def test_nothing_changes_until_commit():
    versions: dict = {}
    b = Book(versions, {}, calendar=Calendar("UTC"), warning_state="sleeping", decimals=2, config_version=CFG)
    first = b.on_closed("month", "2024-01", JAN1, FEB1, month())
    assert versions == {}  # a crash before publishing leaves no trace ...
    b2 = Book(versions, {}, calendar=Calendar("UTC"), warning_state="sleeping", decimals=2, config_version=CFG)
    again = b2.on_closed("month", "2024-01", JAN1, FEB1, month())
    assert canonical(again.snapshots[0]) == canonical(first.snapshots[0])  # ... so the retry publishes the same bytes
    b2.commit(again)
    assert versions["month/2024-01"]["version"] == 1


def test_two_interleaved_calls_commit_only_their_own_changes():
    versions: dict = {}
    b = Book(versions, {}, calendar=Calendar("UTC"), warning_state="sleeping", decimals=2, config_version=CFG)
    jan = b.on_closed("month", "2024-01", JAN1, FEB1, month())
    feb = b.on_closed("month", "2024-02", FEB1, 1_709_251_200_000, month(orders=1))
    b.commit(feb)  # the other agent's call, still being published, is not recorded with it
    assert set(versions) == {"month/2024-02"}
    b.commit(jan)
    assert set(versions) == {"month/2024-01", "month/2024-02"}
