"""Prometheus export: fresh CollectorRegistry per test, asserts with get_sample_value."""

from __future__ import annotations

import subprocess

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kpimon.agents.core.batch import Tally
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.metrics.exporter import KpimonMetrics, StateCollector
from kpimon.config.settings import from_mapping
from kpimon.streams.events import Decoder

DAY = 86_400_000
JAN1 = 1_704_067_200_000


@pytest.fixture
def settings():
    return from_mapping({}, "<test>", env={})


@pytest.fixture
def registry():
    return CollectorRegistry()


def test_batch_tally_lands_on_prebound_children(registry, settings):
    m = KpimonMetrics(registry, settings.event_types, settings.channels, 2)
    m.observe(Tally(types={"login": 3, "weird_type": 2}, signups={"organic": 1, "tiktok": 1}, orders=2,
                    gross=1999 + 1, revenue=1999 + 1 - 50, refunds=50, invites=1, rejected={"not_json": 4},
                    duplicates=2, late=1))
    m.observe_transitions({(0, 1): 5, (3, 0): 2})
    get = registry.get_sample_value
    assert get("kpimon_events_total", {"type": "login"}) == 3
    assert get("kpimon_events_total", {"type": "other"}) == 2  # not in the allow-list
    assert get("kpimon_signups_total", {"channel": "organic"}) == 1
    assert get("kpimon_signups_total", {"channel": "other"}) == 1
    assert get("kpimon_revenue_total") == pytest.approx(20.00)
    assert get("kpimon_refunds_total") == pytest.approx(0.50)
    assert get("kpimon_orders_total") == 2
    assert get("kpimon_invites_total") == 1
    assert get("kpimon_events_rejected_total", {"reason": "not_json"}) == 4
    assert get("kpimon_events_rejected_total", {"reason": "too_large"}) == 0  # bound up front
    assert get("kpimon_events_duplicate_total") == 2
    assert get("kpimon_events_late_total") == 1
    assert get("kpimon_lifecycle_transitions_total", {"from": "active", "to": "silent"}) == 5
    assert get("kpimon_lifecycle_transitions_total", {"from": "churned", "to": "active"}) == 2


def _engine(settings, events):
    engine = PartitionEngine(EngineConfig.from_settings(settings))
    dec = Decoder()
    for ev in events:
        engine.offer(dec.decode(orjson.dumps(ev)))
    return engine


def test_state_gauges_are_computed_at_scrape_time_and_summed_over_partitions(registry, settings):
    e1 = _engine(settings, [
        {"event_id": "1", "user_id": "a", "type": "signup", "ts": JAN1 + 1000},
        {"event_id": "2", "user_id": "a", "type": "purchase", "ts": JAN1 + 2000, "amount": "10.25"},
    ])
    e2 = _engine(settings, [{"event_id": "3", "user_id": "b", "type": "login", "ts": JAN1 + 5 * DAY}])
    e1.advance(marker=JAN1 + 8 * DAY + 1)  # a is silent (gap > 7d); b is active
    e2.advance(marker=JAN1 + 8 * DAY + 1)
    registry.register(StateCollector(lambda: [e1, e2], 2))
    get = registry.get_sample_value
    assert get("kpimon_lifecycle_users", {"state": "active"}) == 1
    assert get("kpimon_lifecycle_users", {"state": "silent"}) == 1
    assert get("kpimon_active_users", {"window": "7d"}) == 1
    assert get("kpimon_active_users", {"window": "30d"}) == 2
    assert get("kpimon_watermark_timestamp_seconds") == (JAN1 + 8 * DAY + 1) / 1000
    # January is the open month of both partitions: values add up, money in currency units.
    assert get("kpimon_period_value", {"metric": "active_users", "grain": "month"}) == 2
    assert get("kpimon_period_value", {"metric": "revenue", "grain": "month"}) == pytest.approx(10.25)
    assert get("kpimon_period_value", {"metric": "entered_silent", "grain": "month"}) == 1
    # The open day has no activity yet.
    assert get("kpimon_period_value", {"metric": "active_users", "grain": "day"}) == 0
    # Growth so far: a and b are new this month; both were active last week (Jan 1-7) and not yet in the open
    # one (from Jan 8): dormant so far; nobody was active yesterday.
    assert get("kpimon_period_value", {"metric": "growth_new", "grain": "month"}) == 2
    assert get("kpimon_period_value", {"metric": "growth_retained", "grain": "month"}) == 0
    assert get("kpimon_period_value", {"metric": "growth_dormant", "grain": "week"}) == 2
    assert get("kpimon_period_value", {"metric": "growth_dormant", "grain": "day"}) == 0
    # A partition whose open period's growth is unknown (restored from numbers of an earlier version): the growth
    # gauges of that period are absent, not partial sums.
    e2._accs[3].growth = False  # the quarter
    assert get("kpimon_period_value", {"metric": "growth_new", "grain": "quarter"}) is None
    assert get("kpimon_period_value", {"metric": "active_users", "grain": "quarter"}) == 2
    assert get("kpimon_period_value", {"metric": "growth_new", "grain": "month"}) == 2
    # N-day retention so far: a signed up on Jan 1, its day 1 (Jan 2) and day 7 (Jan 8) are past, without
    # activity; its day 30 is not reached.
    assert get("kpimon_period_retention_users", {"grain": "month", "n": "d1", "kind": "eligible"}) == 1
    assert get("kpimon_period_retention_users", {"grain": "month", "n": "d1", "kind": "retained"}) == 0
    assert get("kpimon_period_retention_users", {"grain": "month", "n": "d7", "kind": "eligible"}) == 1
    assert get("kpimon_period_retention_users", {"grain": "month", "n": "d30", "kind": "eligible"}) == 0
    # a's purchase is a first purchase; its activation (purchase within 7 days of the signup day) is due on Jan 8.
    assert get("kpimon_period_value", {"metric": "first_purchases", "grain": "month"}) == 1
    assert get("kpimon_period_value", {"metric": "referred_revenue", "grain": "month"}) == 0  # a was not referred
    assert get("kpimon_period_value", {"metric": "inviters", "grain": "month"}) == 0
    assert get("kpimon_period_value", {"metric": "activation_eligible", "grain": "month"}) == 1
    assert get("kpimon_period_value", {"metric": "activation_converted", "grain": "month"}) == 1
    # A partition that cannot know the 7-day retention of the month: absent, not a partial sum.
    e2._accs[2].retention = {n: v for n, v in (e2._accs[2].retention or {}).items() if n != 7}
    assert get("kpimon_period_retention_users", {"grain": "month", "n": "d7", "kind": "eligible"}) is None
    assert get("kpimon_period_retention_users", {"grain": "month", "n": "d1", "kind": "eligible"}) == 1


def test_exposition_passes_promtool(registry, settings):
    m = KpimonMetrics(registry, settings.event_types, settings.channels, 2)
    m.observe(Tally(types={"login": 1}))
    registry.register(StateCollector(lambda: [], 2))
    out = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry), capture_output=True)
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
