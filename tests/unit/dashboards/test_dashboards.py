"""Dashboards and alert rules: generated files are current, PromQL names real metrics, promtool agrees.

The dashboard queries are also run against a real Prometheus scraping a real
worker in tests/integration/test_dashboard_queries.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from kpimon.dashboards import build
from kpimon.dashboards import queries as dq

ROOT = Path(__file__).resolve().parents[3]
RULES_DIR = ROOT / "deploy" / "rules"
# What Grafana substitutes; any value works for these offline checks.
SAMPLE_VALUES = {"__rate_interval": "1m", "kpi": "revenue|new_users", "grain": "month", "cohort_grain": "week",
                 "warning_state": "sleeping", "datasource": "kpimon-prometheus"}


def _family_names(registry: CollectorRegistry) -> tuple[set[str], set[str]]:
    """(names PromQL can select, names of the families) of everything ``registry`` exports."""
    selectable: set[str] = set()
    families: set[str] = set()
    for fam in registry.collect():
        families.add(fam.name)
        selectable.update(s.name for s in fam.samples)
        if fam.type == "counter":
            selectable.update({f"{fam.name}_total", f"{fam.name}_created"})
        elif fam.type == "histogram":
            selectable.update({f"{fam.name}_{s}" for s in ("bucket", "sum", "count", "created")})
        else:
            selectable.add(fam.name)
    return selectable, families


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    """The metric names the product exports, from its own collectors on a fresh registry (nothing started)."""
    from kpimon.agents.core.aggregate import Aggregator
    from kpimon.agents.core.ledger import Book
    from kpimon.agents.core.periods import Calendar
    from kpimon.agents.metrics.cohorts import CohortCollector
    from kpimon.agents.metrics.exporter import KpimonMetrics, StateCollector, new_registry
    from kpimon.agents.metrics.live_kpis import KpiCollector
    from kpimon.agents.serving.writer import ServingWriter
    from kpimon.agents.worker.health import Health
    from kpimon.config.settings import from_mapping

    settings = from_mapping({}, "<test>", env={})
    registry = new_registry()
    KpimonMetrics(registry, settings.event_types, settings.channels, settings.money.decimals)
    registry.register(StateCollector(lambda: [], settings.money.decimals))
    registry.register(KpiCollector(lambda: None))
    registry.register(CohortCollector(Book({}, {}, calendar=Calendar("UTC"), warning_state="sleeping", decimals=2,
                                           config_version={}), Aggregator({}), Calendar("UTC"), 12, lambda: False))
    ServingWriter(settings, registry)
    Health(registry)
    return _family_names(registry)


def _all_dashboard_queries() -> list[dq.PanelQuery]:
    return [q for d in dq.dashboards().values() for q in dq.panel_queries(d)]


# ------------------------------------------------------------------ generated files
def test_committed_dashboards_are_exactly_what_build_generates():
    stale = build.stale()
    assert not stale, f"dashboards/generated is stale ({', '.join(stale)}): run `python -m dashboards.build`"
    assert set(dq.dashboards()) == set(build.DASHBOARDS)


def test_build_check_mode_reports_a_stale_file(tmp_path):
    build.write(tmp_path)
    assert build.main(["--check", "--out", str(tmp_path)]) == 0
    victim = tmp_path / "kpimon-operations.json"
    victim.write_text(victim.read_text().replace("Watermark lag", "Watermark lagg"))
    (tmp_path / "old.json").write_text("{}")
    assert build.stale(tmp_path) == ["kpimon-operations.json", "old.json"]
    assert build.main(["--check", "--out", str(tmp_path)]) == 1


def test_dashboards_are_well_formed():
    boards = dq.dashboards()
    assert {d["title"] for d in boards.values()} == {
        "kpimon — KPIs vs targets", "kpimon — lifecycle & AARRR", "kpimon — operations"}
    for uid, dash in boards.items():
        ids = [p["id"] for p in dq.panels(dash)]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
        defined = {v["name"] for v in dash["templating"]["list"]}
        for panel in dq.panels(dash):
            if panel["type"] == "row":
                continue
            targets = panel.get("targets", [])
            assert targets, f"{uid} / {panel['title']}: no query"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            refs = [t["refId"] for t in targets]
            assert all(refs) and len(refs) == len(set(refs)), f"{uid} / {panel['title']}: refIds {refs}"
            for t in targets:
                assert t["datasource"] == panel["datasource"]
                used = {m.group(1) or m.group(2) for m in re.finditer(r"\$\{(\w+)\}|\$(\w+)", t["expr"])}
                assert used - {"__rate_interval"} <= defined, f"{uid} / {panel['title']}: undefined {used}"
            if panel.get("repeat"):
                assert panel["repeat"] in defined
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, f"{uid} / {panel['title']}: {pos}"


def test_the_kpi_dashboard_shows_every_kpi_against_its_target():
    dash = dq.dashboards()["kpimon-kpis"]
    assert dq.variable_queries(dash) == {"kpi": "label_values(kpimon_kpi_status, kpi)"}
    kpi_var = next(v for v in dash["templating"]["list"] if v["name"] == "kpi")
    assert kpi_var["includeAll"] and kpi_var["multi"] and kpi_var["current"]["value"] == "$__all"
    repeated = [p for p in dq.panels(dash) if p.get("repeat") == "kpi"]
    assert len(repeated) == 1
    exprs = [t["expr"] for t in repeated[0]["targets"]]
    assert exprs == ['kpimon_kpi_actual{kpi=~"$kpi"}', 'kpimon_kpi_target{kpi=~"$kpi"}']


# ------------------------------------------------------------------ metric names
def test_every_query_names_only_metrics_the_product_exports(exported):
    selectable, _ = exported
    recorded = {r["record"] for r in dq.rules() if "record" in r}
    unknown = []
    exprs = [(str(q), q.expr) for q in _all_dashboard_queries()]
    exprs += [(f"variable {d['uid']}/{n}", e) for d in dq.dashboards().values()
              for n, e in dq.variable_queries(d).items()]
    exprs += [(r.get("alert") or r["record"], r["expr"]) for r in dq.rules()]
    assert len(exprs) > 50
    for where, expr in exprs:
        for name in dq.metric_names(expr) - selectable:
            unknown.append(f"{name} in {where}")
        for name in dq.recorded_names(expr) - recorded:
            unknown.append(f"undefined recording rule {name} in {where}")
    assert not unknown, "\n".join(unknown)


def test_the_names_found_in_the_source_are_the_registered_ones(exported):
    """Guards the fixture above: a metric created somewhere in agents/ must be registered there too."""
    selectable, families = exported
    # string literals (not identifiers), but not route names such as name="kpimon_api_user"
    literal = re.compile(r"""(?<!name=)["'](kpimon_[a-z0-9_]+)["']""")
    found = set()
    for path in (ROOT / "agents").rglob("*.py"):
        found |= set(literal.findall(path.read_text(encoding="utf-8")))
    assert {"kpimon_events", "kpimon_serving_up", "kpimon_lifecycle_users"} <= found
    missing = found - families - selectable
    assert not missing, f"metrics in agents/ that tests/unit/dashboards/test_dashboards.py does not register: {missing}"


def test_every_exported_metric_family_is_on_a_dashboard(exported):
    """Adding a metric means adding a panel for it (dashboards/build.py)."""
    _, families = exported
    used = set().union(*(dq.metric_names(q.expr) for q in _all_dashboard_queries()))
    bare = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families - bare == set()


# ------------------------------------------------------------------ promtool
def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    out = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def test_promtool_accepts_the_rules_and_the_prometheus_config():
    _promtool("check", "rules", str(RULES_DIR / "kpimon.rules.yml"))
    out = _promtool("check", "config", str(ROOT / "deploy" / "prometheus.yml"))
    assert "1 rule files found" in out.stdout + out.stderr


def test_promtool_rule_unit_tests_pass():
    _promtool("test", "rules", "kpimon.rules.test.yml", cwd=RULES_DIR)


def test_every_alert_has_a_firing_and_a_quiet_case():
    spec = yaml.safe_load((RULES_DIR / "kpimon.rules.test.yml").read_text())
    alerts = {r["alert"] for r in dq.rules() if "alert" in r}
    firing, quiet = set(), set()
    for test in spec["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts == firing == quiet, (alerts, firing, quiet)


def test_dashboard_queries_parse_as_promql(tmp_path):
    """promtool parses each query (variables substituted) as a recording rule."""
    queries = _all_dashboard_queries()
    groups = [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard:query_{i}", "expr": dq.expand(q.expr, SAMPLE_VALUES)} for i, q in enumerate(queries)]}]
    path = tmp_path / "queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    _promtool("check", "rules", str(path))


def test_the_alerts_use_the_documented_thresholds():
    by_name = {r.get("alert") or r["record"]: r for r in dq.rules()}
    spike = by_name["KpimonPreChurnSpike"]
    assert "> 2 * kpimon:lifecycle_entries:increase1h_same_hour_avg7d" in spike["expr"] and ">= 20" in spike["expr"]
    assert by_name["KpimonKpiOffTrack"]["for"] == "1h"
    assert by_name["KpimonRejectedEventsHigh"]["expr"].strip().endswith("> 0.01")
    assert by_name["KpimonRejectedEventsHigh"]["for"] == "10m"
    assert "[10m]" in by_name["KpimonWatermarkStalled"]["expr"]
    assert by_name["KpimonServingLayerDown"]["for"] == "5m"
    baseline = by_name["kpimon:lifecycle_entries:increase1h_same_hour_avg7d"]["expr"]
    assert [f"offset {d}d" in baseline for d in range(1, 8)] == [True] * 7


# ------------------------------------------------------------------ provisioning
def test_grafana_provisioning_points_at_the_generated_dashboards_and_prometheus():
    prov = yaml.safe_load((ROOT / "dashboards" / "provisioning" / "dashboards.yaml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/kpimon"
    ds = yaml.safe_load((ROOT / "dashboards" / "provisioning" / "datasources.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["rules/kpimon.rules.yml"]
