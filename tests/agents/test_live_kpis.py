"""Live KPI gauges and /api/kpis data from the aggregation agent's view of every partition."""

from __future__ import annotations

from unittest.mock import AsyncMock, patch

import pytest

from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.streams import topics as wire
from tests.agents.conftest import agent_app, delivered

MAR1 = 1_709_251_200_000
APR1 = 1_711_929_600_000
MAR16 = MAR1 + 15 * 86_400_000


@pytest.fixture
def app():
    return agent_app("livetest.", 16067, kpis="kpis.yaml", clock="event")


def progress(p: int, n: int, revenue: int, active: int, paying: int) -> bytes:
    m = PeriodMetrics()
    m.revenue, m.active_users, m.paying_users = revenue, active, paying
    open_ = [wire.OpenPeriod("month", "2024-03", MAR1, APR1, m.to_wire())]
    return wire.json_encode(wire.Progress(p, n, MAR16, {"accepted": 1}, open_))


async def test_live_kpis_merge_every_partition_and_export_bounded_gauges(app):
    with patch.object(app.kpimon_periods_topic, "send", AsyncMock(side_effect=delivered)):
        async with app.kpimon_aggregate_agent.test_context() as agent:
            await agent.put(progress(0, 2, revenue=300_000, active=100, paying=10))
            await agent.put(progress(1, 2, revenue=200_000, active=150, paying=15))
    data = app.kpimon_live.evaluate()
    by_kpi = {k["kpi"]: k for k in data["kpis"]}
    assert by_kpi["revenue"]["actual"] == "5000.00"  # 3000 + 2000, both partitions
    assert by_kpi["arppu"]["actual"] == "200.00"  # 5000 / 25 paying users, not a per-worker ratio
    assert not by_kpi["revenue"]["closed"]
    # Event clock: as of the global watermark, 15 of March's 31 days have elapsed ...
    assert by_kpi["active_users"]["expected_progress"] == "0.4839"
    # ... shaped by the revenue KPI's day-of-month profile (the 1st weighs 2, the 25th and 26th 1.5).
    assert by_kpi["revenue"]["expected_progress"] == "0.4848"  # 16/33
    get = app.kpimon_registry.get_sample_value
    assert get("kpimon_kpi_actual", {"kpi": "revenue"}) == 5000.0
    assert get("kpimon_kpi_expected_progress_ratio", {"kpi": "active_users"}) == pytest.approx(15 / 31, abs=1e-4)
    status = by_kpi["revenue"]["status"]
    assert get("kpimon_kpi_status", {"kpi": "revenue", "status": status}) == 1.0
    assert sum(get("kpimon_kpi_status", {"kpi": "revenue", "status": s}) for s in
               ("on_track", "at_risk", "off_track", "no_data", "no_target")) == 1.0
    owners = {o["owner"] for o in data["owners"]}
    assert owners and all(get("kpimon_owner_multiplier", {"owner": o}) is not None for o in owners
                          if next(x for x in data["owners"] if x["owner"] == o)["multiplier"] is not None)


async def test_a_worker_without_the_aggregation_exports_no_kpi_series(app):
    assert app.kpimon_registry.get_sample_value("kpimon_kpi_actual", {"kpi": "revenue"}) is None
