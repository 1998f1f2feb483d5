"""Every dashboard query, checked against a real Prometheus that scrapes a real worker.

A `kpimon worker` child process (event clock, the packaged KPI spec, the Redis
serving layer on) runs on Apache Kafka over a small generated history with
invalid and duplicate lines. A real Prometheus scrapes its /metrics every
second and loads deploy/rules/kpimon.rules.yml. Each query of each panel of
dashboards/generated/*.json, with Grafana's variables substituted (the `kpi`
variable from its own label_values query), must return at least one series;
the rules must evaluate without error and the recording rules used by the
alerts must produce series from the real labels.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from kpimon.agents.tools.datasets import generate
from kpimon.config.settings import from_mapping
from kpimon.dashboards import queries as dq
from kpimon.streams.events import Decoder, Rejected

pytestmark = pytest.mark.integration

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval becomes for a 1 s scrape interval and a short range


def _max_ts(lines: list[bytes]) -> int:
    dec = Decoder()
    best = 0
    for line in lines:
        try:
            best = max(best, dec.decode(line).ts)
        except Rejected:
            continue
    return best


def _wait(cond, timeout_s: float, what: str, log) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{log()}")
        time.sleep(0.25)


def test_every_dashboard_query_returns_series_from_a_real_worker(kafka, redis_server, pipeline_factory,
                                                                 prometheus_factory):
    lines = list(generate(3000, start_ms=START, seed=41, users=200, bad_ratio=0.02, duplicate_ratio=0.01))
    until = _max_ts(lines)
    spec = from_mapping({"kpis": "kpis.yaml"}, "<test>", env={}).kpis_path()  # config/kpis.yaml
    p = pipeline_factory(kafka.bootstrap, kpis=str(spec), worker={"clock": "event"},
                         redis={"enabled": True, "url": redis_server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}:"})
    worker = p.start_worker()
    prom = prometheus_factory([f"127.0.0.1:{p.settings.worker.web_port}"], rule_files=[dq.RULES],
                              scrape_interval="1s")

    def log() -> str:
        return f"targets: {prom.targets()}\n{p.log()}"

    # Traffic arrives after Prometheus has seen the counters at 0, so rates are not 0/0.
    _wait(lambda: bool(prom.query("kpimon_events_total")), 60, "a first scrape of the worker", log)
    p.produce(lines)
    p.mark(until)

    # The worker has applied everything up to the marker, and the aggregator evaluates the KPIs.
    def caught_up() -> bool:
        assert worker.poll() is None, p.log()
        wm = prom.query_value("min(kpimon_watermark_timestamp_seconds)")
        return wm is not None and wm * 1000 >= until and bool(prom.query("kpimon_kpi_target"))
    _wait(caught_up, 90, "the worker to reach the watermark marker and export KPIs", log)

    boards = dq.dashboards()
    assert set(boards) == {"kpimon-kpis", "kpimon-lifecycle", "kpimon-operations"}
    pending: dict[str, str] = {}  # expanded query -> where it is used
    for dash in boards.values():
        values = {"__rate_interval": RATE_INTERVAL, **dq.variable_defaults(dash)}
        for name, var_query in dq.variable_queries(dash).items():
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var_query)
            assert m, f"{dash['uid']}: variable {name}: unsupported query {var_query!r}"
            found = prom.api(f"label/{m.group(2)}/values", {"match[]": m.group(1)})
            assert found, f"{dash['uid']}: variable {name} ({var_query}) has no values"
            values[name] = "|".join(re.escape(v) for v in found)  # Grafana's "All" of a multi-value variable
        for q in dq.panel_queries(dash):
            pending.setdefault(dq.expand(q.expr, values), str(q))
    assert len(pending) > 50

    # Range functions need two scrapes of a series: poll until every query has a result.
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        for expr in list(pending):
            if prom.query(expr):
                del pending[expr]
        if pending:
            time.sleep(0.5)
    assert not pending, "queries without a series:\n" + "\n".join(pending.values()) + "\n" + log()

    # The rules load and evaluate without error on the real series.
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(dq.rules())
    bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") == "err" or r.get("lastError")]
    assert not bad, bad
    for record in ("kpimon:events_received:rate5m", "kpimon:events_rejected:ratio_rate5m",
                   'kpimon:lifecycle_entries:increase1h{to="sleeping"}'):
        _wait(lambda record=record: bool(prom.query(record)), 15, f"recording rule {record}", log)
    ratio = prom.query_value("kpimon:events_rejected:ratio_rate5m")
    assert ratio is not None and 0 < ratio < 0.1, ratio  # the dataset has 2 % invalid lines

