"""A failing agent is reported (/healthz 503, kpimon_loop_crashes_total) and stops the worker, once."""

from __future__ import annotations

import asyncio
from unittest.mock import AsyncMock, patch

import orjson
import pytest

from kpimon.agents.worker.health import Health, describe
from tests.agents.conftest import agent_app, delivered, until
from tests.agents.test_aggregate_agent import DAY, JAN1, partial, progress


@pytest.fixture
def app():
    app = agent_app("agentfail.", 16067)
    app.fatal_reasons = []
    app.kpimon_on_fatal = app.fatal_reasons.append  # what `kpimon worker` turns into exit code 1
    return app


def crashes(app, loop: str) -> float:
    return app.kpimon_registry.get_sample_value("kpimon_loop_crashes_total", {"loop": loop})


async def test_an_undecodable_partials_record_marks_aggregate_down_and_stops_the_worker(app):
    assert app.kpimon_health.status(partitions=[], batches=0)[0] == 200
    assert crashes(app, "aggregate") == 0
    sent = AsyncMock(side_effect=delivered)
    with patch.object(app.kpimon_periods_topic, "send", sent), \
            patch.object(app.kpimon_snapshots_topic, "send", AsyncMock(side_effect=delivered)):
        async with app.kpimon_aggregate_agent.test_context() as agent:
            await agent.put(partial(0, 1, "2024-01-01", orders=3))
            asyncio.ensure_future(agent.put(b"\x00 not a kpimon message"))
            await until(lambda: app.fatal_reasons)
            # The agent holds the failed record: nothing after it is processed (faust would skip it).
            asyncio.ensure_future(agent.put(progress(0, 1, JAN1 + DAY)))
            await asyncio.sleep(0.2)
            assert sent.await_count == 0
    (reason,) = app.fatal_reasons
    assert type(reason).__name__ == "UndecodableRecord"
    status, body = app.kpimon_health.status(partitions=[0], batches=3)
    assert status == 503
    assert body["status"] == "down" and body["partitions"] == [0]
    assert set(body["down"]) == {"aggregate"}
    assert body["down"]["aggregate"]["reason"].startswith("UndecodableRecord: undecodable record at ")
    assert body["crashes"]["aggregate"] == 1
    assert crashes(app, "aggregate") == 1 and crashes(app, "ingest") == 0


async def test_a_failing_restate_agent_is_reported_like_aggregate(app):
    with patch.object(app.kpimon_book, "on_late", side_effect=RuntimeError("broker gone")):
        async with app.kpimon_restate_agent.test_context() as late:
            asyncio.ensure_future(late.put(orjson.dumps({"event_id": "late-1", "user_id": "u1", "type": "purchase",
                                                         "ts": JAN1 + 5000, "amount": "1.00"}),
                                           headers={"kpimon-watermark": str(JAN1 + DAY + 1).encode()}))
            await until(lambda: app.fatal_reasons)
    assert crashes(app, "restate") == 1
    assert app.kpimon_health.down["restate"].reason == "RuntimeError: broker gone"


def test_health_reports_the_first_reason_counts_every_failure_and_bounds_the_reason():
    health = Health()
    assert health.status() == (200, {"status": "ok", "crashes": {"ingest": 0, "aggregate": 0, "restate": 0,
                                                                   "faust": 0}})
    health.crashed("ingest", ValueError("first\nline"))
    health.crashed("ingest", ValueError("second"))
    status, body = health.status()
    assert status == 503 and body["down"]["ingest"]["reason"] == "ValueError: first line"
    assert body["crashes"]["ingest"] == 2
    assert len(describe(RuntimeError("x" * 5000))) == 500


async def test_the_ledger_tables_can_be_written_after_a_batch_was_taken(app):
    """`restate` commits after `take_events` returned, outside the stream's iteration (no current event):
    a plain faust Table raises TypeError there, which crashed the agent and lost the restatements."""
    from faust.streams import current_event

    assert current_event() is None
    book = app.kpimon_book
    # The ledger lives in the aggregation's state Table (one changelog for all their writes).
    assert book.versions.base is book.pending.base is app.kpimon_aggregator.state
    with patch.object(app.kpimon_aggregator.state.changelog_topic, "send_soon") as sent:
        book.versions["day/2024-01-01"] = {"version": 1}
        book.pending["day/2024-01-01"] = [{"event_id": "late-1"}]
    assert [c.kwargs["partition"] for c in sent.call_args_list] == [0, 0]
    assert [c.kwargs["key"] for c in sent.call_args_list] == ["ledger/day/2024-01-01", "pending/day/2024-01-01"]


async def test_partials_deleted_before_they_were_applied_stop_the_worker(app):
    """A gap that the broker cannot fill (records deleted by retention) would make the numbers inexact."""
    partials_at, _ = app.kpimon_cursors
    with patch.object(app.kpimon_periods_topic, "send", AsyncMock(side_effect=delivered)), \
            patch.object(app.kpimon_snapshots_topic, "send", AsyncMock(side_effect=delivered)):
        async with app.kpimon_aggregate_agent.test_context() as agent:
            partials_at.broker[2] = (partial(0, 1, "2024-01-01", orders=1), ())  # 0 and 1 are gone
            agent.sent_offset = 3
            asyncio.ensure_future(agent.put(progress(0, 1, JAN1 + DAY)))
            await until(lambda: app.fatal_reasons)
    (reason,) = app.fatal_reasons
    assert type(reason).__name__ == "RecordsLost" and "records 0 to 1 were deleted" in str(reason)
