"""The faust `aggregate` agent with faust's test_context and memory Tables (no broker)."""

from __future__ import annotations

import asyncio
from unittest.mock import AsyncMock, patch

import orjson
import pytest

from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.streams import topics as wire
from tests.agents.conftest import agent_app, delivered, until

DAY = 86_400_000
JAN1 = 1_704_067_200_000


@pytest.fixture
def app():
    return agent_app("agenttest.", 16066)


def partial(p: int, n: int, label: str, **values: int) -> bytes:
    m = PeriodMetrics()
    for k, v in values.items():
        setattr(m, k, v)
    return wire.json_encode(wire.Partial(p, n, "day", label, JAN1, JAN1 + DAY, m.to_wire()))


def progress(p: int, n: int, wm: int, accepted: int = 0) -> bytes:
    return wire.json_encode(wire.Progress(p, n, wm, {"accepted": accepted, "rejected": {"not_json": 1},
                                                     "duplicates": 0, "late": 0}))


async def test_a_period_closes_only_when_every_partition_passed_its_end(app):
    sent = AsyncMock(side_effect=delivered)
    snaps = AsyncMock(side_effect=delivered)
    with patch.object(app.kpimon_periods_topic, "send", sent), patch.object(app.kpimon_snapshots_topic, "send", snaps):
        async with app.kpimon_aggregate_agent.test_context() as agent:
            await agent.put(partial(0, 2, "2024-01-01", orders=3, active_users=2))
            await agent.put(progress(0, 2, JAN1 + DAY, accepted=10))
            assert sent.await_count == 0  # partition 1 has not reported yet
            await agent.put(partial(1, 2, "2024-01-01", orders=4, active_users=1))
            await agent.put(progress(1, 2, JAN1 + DAY - 1, accepted=5))
            assert sent.await_count == 1  # only the global watermark notice
            await agent.put(progress(1, 2, JAN1 + DAY, accepted=6))
            values = [wire.decode_periods(c.kwargs["value"]) for c in sent.await_args_list]
    closed = [v for v in values if isinstance(v, wire.ClosedPeriod)]
    assert len(closed) == 1
    merged = PeriodMetrics.from_wire(closed[0].metrics)
    assert (merged.orders, merged.active_users) == (7, 3)
    last = values[-1]
    assert isinstance(last, wire.GlobalWatermark)
    assert last.watermark == JAN1 + DAY
    assert last.totals["accepted"] == 16 and last.totals["rejected"] == 2
    # The close wrote version 1 of the period's snapshot to the ledger topic.
    (call,) = snaps.await_args_list
    snapshot = orjson.loads(call.kwargs["value"])
    assert call.kwargs["key"] == b"day/2024-01-01/v1"
    assert snapshot["version"] == 1 and snapshot["metrics"]["orders"] == 7
    assert snapshot["hash"].startswith("sha256:")


async def close_day(app, **values: int) -> None:
    """Close 2024-01-01 on one partition with these numbers (the ledger records its version 1)."""
    async with app.kpimon_aggregate_agent.test_context() as agent:
        await agent.put(partial(0, 1, "2024-01-01", **values))
        await agent.put(progress(0, 1, JAN1 + DAY))


async def test_a_late_purchase_after_close_becomes_version_two(app):
    snaps = AsyncMock(side_effect=delivered)
    with patch.object(app.kpimon_periods_topic, "send", AsyncMock(side_effect=delivered)), \
            patch.object(app.kpimon_snapshots_topic, "send", snaps):
        await close_day(app, orders=3, active_users=2)
        async with app.kpimon_restate_agent.test_context() as late:
            # Refused against a watermark just past the day: within the dedup horizon, so it
            # cannot be a retry of a counted event, and it is restated.
            wm = str(JAN1 + DAY + 60_000).encode()
            await late.put(orjson.dumps({"event_id": "late-1", "user_id": "u1", "type": "purchase",
                                         "ts": JAN1 + 5000, "amount": "19.99"}), headers={"kpimon-watermark": wm})
            # Refused long after (beyond the 7-day dedup horizon): maybe a retry; not restated.
            old = str(JAN1 + 30 * DAY).encode()
            await late.put(orjson.dumps({"event_id": "late-2", "user_id": "u2", "type": "purchase",
                                         "ts": JAN1 + 6000, "amount": "5.00"}), headers={"kpimon-watermark": old})
            await asyncio.sleep(1.2)  # the agent takes late events in batches of up to 1 s
    day = [orjson.loads(c.kwargs["value"]) for c in snaps.await_args_list]
    day = [s for s in day if s["grain"] == "day"]
    assert [s["version"] for s in day] == [1, 2]
    assert day[1]["delta"] == {"orders": 1, "revenue": "+19.99"}
    assert day[0]["metrics"]["orders"] == 3 and day[1]["metrics"]["orders"] == 4


async def test_redelivered_partials_and_progress_change_nothing(app):
    sent = AsyncMock(side_effect=delivered)
    with patch.object(app.kpimon_periods_topic, "send", sent), \
            patch.object(app.kpimon_snapshots_topic, "send", AsyncMock(side_effect=delivered)):
        async with app.kpimon_aggregate_agent.test_context() as agent:
            for _ in range(2):
                await agent.put(partial(0, 1, "2024-01-01", orders=3, active_users=2))
                await agent.put(progress(0, 1, JAN1 + DAY))
            values = [wire.decode_periods(c.kwargs["value"]) for c in sent.await_args_list]
    closed = [v for v in values if isinstance(v, wire.ClosedPeriod)]
    assert len(closed) == 1  # a closed period is never re-emitted
    assert PeriodMetrics.from_wire(closed[0].metrics).orders == 3


async def test_partials_that_faust_did_not_deliver_are_read_from_the_broker_and_applied_first(app):
    """faust can drop records fetched around a rebalance and go on past them (agents/worker/inorder.py)."""
    sent = AsyncMock(side_effect=delivered)
    partials_at, _ = app.kpimon_cursors
    with patch.object(app.kpimon_periods_topic, "send", sent), \
            patch.object(app.kpimon_snapshots_topic, "send", AsyncMock(side_effect=delivered)):
        async with app.kpimon_aggregate_agent.test_context() as agent:
            await agent.put(partial(0, 2, "2024-01-01", orders=3))  # offset 0
            partials_at.broker[1] = (partial(1, 2, "2024-01-01", orders=4), ())  # offset 1: never delivered
            agent.sent_offset = 2
            await agent.put(progress(0, 2, JAN1 + DAY))
            await agent.put(progress(1, 2, JAN1 + DAY))
            await until(lambda: sent.await_count == 2)
    closed = [v for v in (wire.decode_periods(c.kwargs["value"]) for c in sent.await_args_list)
              if isinstance(v, wire.ClosedPeriod)]
    assert [PeriodMetrics.from_wire(c.metrics).orders for c in closed] == [7]  # both partitions' partials
    assert partials_at.refetched == 1 and await partials_at.next() == 4


async def test_a_record_below_the_cursor_is_skipped_whatever_it_holds(app):
    """A redelivery (after a crash or a rebalance) of a record already applied changes nothing, by its offset."""
    sent = AsyncMock(side_effect=delivered)
    with patch.object(app.kpimon_periods_topic, "send", sent), \
            patch.object(app.kpimon_snapshots_topic, "send", AsyncMock(side_effect=delivered)):
        async with app.kpimon_aggregate_agent.test_context() as agent:
            await agent.put(partial(0, 1, "2024-01-01", orders=3))
            agent.sent_offset = 0
            await agent.put(partial(0, 1, "2024-01-01", orders=99))  # offset 0 again
            await agent.put(progress(0, 1, JAN1 + DAY))
            await until(lambda: sent.await_count == 2)
    closed = wire.decode_periods(sent.await_args_list[0].kwargs["value"])
    assert isinstance(closed, wire.ClosedPeriod) and PeriodMetrics.from_wire(closed.metrics).orders == 3


async def test_late_events_that_faust_did_not_deliver_are_restated_too(app):
    snaps = AsyncMock(side_effect=delivered)
    _, late_at = app.kpimon_cursors
    wm = [("kpimon-watermark", str(JAN1 + DAY + 60_000).encode())]

    def late_event(i: int, amount: str) -> bytes:
        return orjson.dumps({"event_id": f"late-{i}", "user_id": "u1", "type": "purchase", "ts": JAN1 + 5000,
                             "amount": amount})

    with patch.object(app.kpimon_periods_topic, "send", AsyncMock(side_effect=delivered)), \
            patch.object(app.kpimon_snapshots_topic, "send", snaps):
        await close_day(app, orders=3, active_users=2)
        async with app.kpimon_restate_agent.test_context() as late:
            late_at.broker[0] = (late_event(0, "10.00"), wm)  # never delivered
            late.sent_offset = 1
            await late.put(late_event(1, "1.00"), headers=dict(wm))
            await until(lambda: snaps.await_count >= 2)
            await asyncio.sleep(0.2)
    day = [s for s in (orjson.loads(c.kwargs["value"]) for c in snaps.await_args_list) if s["grain"] == "day"]
    assert [s["version"] for s in day] == [1, 2]
    assert day[1]["delta"] == {"orders": 2, "revenue": "+11.00"}  # both late purchases, in one restatement
    assert late_at.refetched == 1 and await late_at.next() == 2
