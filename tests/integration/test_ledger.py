"""KPI scorecards and the period-close ledger on real Kafka and Redis."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from fractions import Fraction

import orjson
import pytest
import redis
import yaml

from kpimon.agents.core.periods import Calendar
from kpimon.agents.serving.snapshots import read_versions
from kpimon.agents.tools.datasets import generate
from kpimon.config.settings import from_mapping
from tests.integration.conftest import Pipeline
from tests.integration.test_pipeline import START, good_events, until_after
from tests.reference import reference_report

pytestmark = pytest.mark.integration

FEB = ("month", "2024-02")


def payout(a: Fraction) -> Fraction:
    """The default curve, written out: <0.8 -> 0; 0.8 -> 0.5; 1.0 -> 1.0; >=1.2 -> 1.5, linear between."""
    if a < Fraction(4, 5):
        return Fraction(0)
    if a <= 1:
        return Fraction(1, 2) + (a - Fraction(4, 5)) * Fraction(5, 2)
    return min(Fraction(3, 2), 1 + (a - 1) * Fraction(5, 2))


def decimal(x: Fraction) -> str:
    """A target as the spec takes it: a decimal string (rounded to cents)."""
    return str((Decimal(x.numerator) / Decimal(x.denominator)).quantize(Decimal("0.01")))


def four(x: Fraction) -> str:
    """Four decimals, half to even, as snapshots print ratios."""
    return str((Decimal(x.numerator) / Decimal(x.denominator)).quantize(Decimal("0.0001")))


@pytest.fixture(scope="module")
def ledger_pipeline(kafka, redis_server, tmp_path_factory):
    """One run shared by this module's tests (built once: a worker, 6000 events, closed periods).

    Sharing is safe in either order: the late-event test adds versions only to a day near ``until``
    and checks that February (the period the scorecard test reads) stays at version 1.
    """
    tmp_path = tmp_path_factory.mktemp("ledger")
    lines = list(generate(6000, start_ms=START, seed=21, users=400))
    until = until_after(lines, days=40)
    settings = from_mapping({}, "<test>", env={})  # the defaults a Pipeline starts from (timezone, thresholds)
    ref = reference_report(good_events(lines), settings, until)
    feb = ref[FEB]
    orders = Fraction(feb["orders"])
    arppu = Fraction(feb["revenue"]) / feb["paying_users"]
    warnings = Fraction(feb["churn_warnings"])
    spec = {
        "kpis": [
            {"id": "orders", "name": "Orders", "metric": "orders", "grain": "month",
             "target": {"2024-02": str(orders)}},
            {"id": "arppu", "name": "ARPPU", "formula": "revenue / paying_users", "grain": "month",
             "target": {"2024-02": decimal(arppu * Fraction(5, 4))}},
            {"id": "warnings", "name": "Churn warnings", "metric": "churn_warnings", "grain": "month",
             "direction": "lower", "department": "d1", "target": {"2024-02": decimal(warnings * Fraction(11, 10))}},
        ],
        "owners": [
            {"id": "co", "name": "Company", "level": "company", "scope": "all", "manager": True,
             "kpis": [{"kpi": "orders", "weight": 0.5}, {"kpi": "arppu", "weight": 0.5}]},
            {"id": "d1", "name": "Lifecycle", "level": "department", "parent": "co", "manager": True,
             "kpis": [{"kpi": "warnings", "weight": 1}]},
        ],
    }
    spec_path = tmp_path / "kpis.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    prefix = f"test{os.getpid()}{int(time.time() * 1000) % 100000}:"
    p = Pipeline(kafka.bootstrap, str(tmp_path), kpis=str(spec_path),
                 redis={"url": redis_server.url, "enabled": True, "key_prefix": prefix})
    try:
        p.produce(lines)
        p.mark(until)
        p.start_worker()
        report = p.report(until)
        p.until = until
        yield p, report, spec, feb, redis_server, prefix
    finally:
        p.close()


def _kpimon(p, *args: str) -> str:
    env = dict(os.environ, KPIMON_REDIS_URL=p.settings.redis.url)
    out = subprocess.run([sys.executable, "-m", "kpimon", *args, "--config", p.config_path],
                         capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode()


def test_closed_snapshots_carry_the_scorecards_of_a_plain_computation(ledger_pipeline):
    p, report, spec, feb, server, prefix = ledger_pipeline
    snap = read_versions(server.client(), prefix, *FEB)
    assert [s["version"] for s in snap] == [1]
    snap = snap[0]
    assert snap["metrics"] == feb  # the snapshot's numbers are the definitions' numbers

    orders_att = Fraction(feb["orders"]) / Fraction(spec["kpis"][0]["target"]["2024-02"])
    arppu_att = (Fraction(feb["revenue"]) / feb["paying_users"]) / Fraction(spec["kpis"][1]["target"]["2024-02"])
    warn_att = Fraction(spec["kpis"][2]["target"]["2024-02"]) / Fraction(feb["churn_warnings"])
    co = Fraction(1, 2) * payout(orders_att) + Fraction(1, 2) * payout(arppu_att)
    owners = {o["owner"]: o for o in snap["owners"]}
    assert owners["co"]["multiplier"] == four(co)
    assert owners["d1"]["multiplier"] == four(payout(warn_att))
    # The backfill-style report carries the same part of the snapshot.
    period = next(x for x in report["periods"] if (x["grain"], x["period"]) == FEB)
    assert period["owners"] == snap["owners"] and period["kpis"] == snap["kpis"]
    assert period["snapshot"]["hash"] == snap["hash"]

    card = _kpimon(p, "scorecard", "--owner", "co", "--period", "2024-02")
    assert four(co) in card and "orders" in card
    rows = list(csv.reader(io.StringIO(_kpimon(p, "snapshots", "export", "2024-02", "--format", "csv"))))
    assert rows[0][:3] == ["period", "version", "hash"]
    assert any(r[3:5] == ["owner", "co"] for r in rows)
    listed = _kpimon(p, "snapshots", "list", "--grain", "month")
    assert "2024-02" in listed
    suggestion = _kpimon(p, "targets", "suggest", "--kpi", "orders", "--periods", "1")
    assert "orders" in suggestion


def test_a_late_event_after_close_is_version_two_and_version_one_is_unchanged(ledger_pipeline):
    p, report, spec, feb, server, prefix = ledger_pipeline
    client: redis.Redis = server.client()
    day = Calendar(p.settings.timezone).period_at(p.until - 2 * 86_400_000, "day")
    key = ("day", day.label)
    before = read_versions(client, prefix, *key)
    assert len(before) == 1
    late = orjson.dumps({"event_id": "late-purchase-1", "user_id": "late-user", "type": "purchase",
                         "ts": day.start_ms + 3_600_000, "amount": "12.34"})
    # Older than the 7-day dedup horizon when refused: it could be a retry of an event counted
    # long ago, so it is late (counted, on kpimon.events.late) but restates nothing.
    ancient = orjson.dumps({"event_id": "late-purchase-2", "user_id": "late-user", "type": "purchase",
                            "ts": "2024-02-10T12:00:00Z", "amount": "99.00"})
    p.produce([late, late, ancient])  # the first one sent twice: restated once
    deadline = time.monotonic() + 60
    while len(read_versions(client, prefix, *key)) < 2:
        assert time.monotonic() < deadline, p.log()
        time.sleep(0.2)
    time.sleep(2)
    versions = read_versions(client, prefix, *key)
    assert [v["version"] for v in versions] == [1, 2]
    v1, v2 = versions
    assert json.dumps(v1, sort_keys=True) == json.dumps(before[0], sort_keys=True)  # version 1 unchanged
    assert v2["delta"] == {"orders": 1, "revenue": "+12.34"}
    assert v2["late_events"] == 1
    assert v2["metrics"]["orders"] == v1["metrics"]["orders"] + 1
    assert v2["hash"] != v1["hash"]
    assert [v["version"] for v in read_versions(client, prefix, *FEB)] == [1]  # the ancient one restated nothing
    shown = json.loads(_kpimon(p, "snapshots", "show", day.label))
    assert [s["version"] for s in shown] == [1, 2]


def test_two_backfills_of_the_same_input_give_byte_identical_snapshots(kafka, tmp_path):
    from kpimon.agents.tools import backfill as bf
    from kpimon.config.settings import from_mapping

    lines = list(generate(3000, start_ms=START, seed=22, users=300))
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    settings = from_mapping({"kpis": "kpis.yaml"}, "<test>", env={})
    until = str(until_after(lines, days=35))
    first = bf.run(str(path), settings, until=until, broker=kafka.bootstrap, partitions=4)
    second = bf.run(str(path), settings, until=until, broker=kafka.bootstrap, partitions=2)
    hashes = [{(p["grain"], p["period"]): p["snapshot"]["hash"] for p in r["periods"] if "snapshot" in p}
              for r in (first, second)]
    assert hashes[0] and hashes[0] == hashes[1]  # same input, same config: same bytes (even on 2 partitions)
    assert first["periods"] == second["periods"]
