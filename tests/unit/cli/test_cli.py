"""The command line: every command reads the file, then the environment, then its flags."""

from __future__ import annotations

import csv
import io
import json

import pytest

from kpimon.agents.cli import ledger as cli_ledger
from kpimon.agents.tools import demo
from tests.cli_support import StandInWorker, flat, invoke, no_kpimon_environment  # noqa: F401 - the fixture is autouse


@pytest.fixture
def workers():
    """Three stand-in workers, each answering a scorecard that names it."""
    servers = {name: StandInWorker(json.dumps({"as_of": name, "kpis": [], "owners": []}).encode())
               for name in ("file", "env", "flag")}
    yield servers
    for s in servers.values():
        s.close()


def _asked(result) -> str:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["as_of"]


def test_kpis_reads_the_file_then_the_environment_then_the_flag(tmp_path, workers):
    cfg = tmp_path / "kpimon.yaml"
    cfg.write_text(f"worker: {{web_port: {workers['file'].port}}}\n")
    assert _asked(invoke(["kpis", "--json", "--config", str(cfg)])) == "file"
    assert _asked(invoke(["kpis", "--json"], env={"KPIMON_CONFIG": str(cfg)})) == "file"
    env = {"KPIMON_WEB_PORT": str(workers["env"].port)}
    assert _asked(invoke(["kpis", "--json", "--config", str(cfg)], env=env)) == "env"
    flag = f"http://127.0.0.1:{workers['flag'].port}"
    assert _asked(invoke(["kpis", "--json", "--config", str(cfg), "--worker", flag], env=env)) == "flag"
    assert workers["file"].paths == ["/api/kpis", "/api/kpis"]


def test_kpis_reports_a_bad_configuration(tmp_path):
    cfg = tmp_path / "kpimon.yaml"
    cfg.write_text("worker: {web_port: 6066}\n")
    result = invoke(["kpis", "--config", str(cfg)], env={"KPIMON_WEB_PORT": "abc"})
    assert result.exit_code == 2
    expected = f"KPIMON_WEB_PORT (overrides {cfg}: worker.web_port): Input should be a valid integer"
    assert flat(expected) in flat(result.output)


@pytest.fixture
def demo_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda settings, **kw: calls.append((settings, kw)))
    return calls


def test_demo_reads_the_file_then_the_environment_then_the_flag(tmp_path, demo_calls):
    assert invoke(["demo"]).exit_code == 0
    settings, kw = demo_calls[-1]
    assert settings.source == str(demo.DEMO_CONFIG) and settings.worker.app_id == "kpimon-demo"
    assert kw["web_port"] == 6066

    assert invoke(["demo"], env={"KPIMON_WEB_PORT": "7123"}).exit_code == 0
    assert demo_calls[-1][1]["web_port"] == 7123

    cfg = tmp_path / "kpimon.yaml"
    cfg.write_text("worker: {web_port: 7001}\n")
    assert invoke(["demo", "--config", str(cfg)]).exit_code == 0
    assert demo_calls[-1][1]["web_port"] == 7001
    assert invoke(["demo", "--config", str(cfg)], env={"KPIMON_WEB_PORT": "7123"}).exit_code == 0
    assert demo_calls[-1][1]["web_port"] == 7123
    assert invoke(["demo", "--config", str(cfg), "--web-port", "7200"], env={"KPIMON_WEB_PORT": "7123"}).exit_code == 0
    assert demo_calls[-1][1]["web_port"] == 7200


def test_demo_reports_a_bad_environment_as_a_configuration_error(demo_calls):
    result = invoke(["demo"], env={"KPIMON_WEB_PORT": "abc"})
    assert result.exit_code == 2
    assert flat(f"KPIMON_WEB_PORT (overrides {demo.DEMO_CONFIG}: worker.web_port): Input should be a valid integer") \
        in flat(result.output)
    assert demo_calls == []


# ----------------------------------------------------------------------------- CSV export of a snapshot

SNAPSHOT = {
    "version": 1, "hash": "sha256:abc",
    "kpis": [{"kpi": "=HYPERLINK(\"http://x\",\"y\")", "actual": "-5.50", "target": "10", "attainment": "-0.5500",
              "multiplier": "0.0000", "status": "off_track"}],
    "owners": [{"owner": "@ana", "score": "0.0000", "multiplier": "0.0000",
                "contributions": [{"kpi": "+cmd", "attainment": "-0.5500", "multiplier": "0.0000",
                                   "status": "off_track", "weight": "1", "contribution": "-0"}]}],
}


def test_snapshot_csv_export_neutralises_formulas_and_keeps_negative_numbers(monkeypatch):
    monkeypatch.setattr(cli_ledger, "_latest", lambda settings, grain, period: SNAPSHOT)
    result = invoke(["snapshots", "export", "2024-02", "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(line.startswith('"') and line.endswith('"') for line in lines)  # every cell quoted
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:3] == ["period", "version", "hash"]
    kpi = dict(zip(rows[0], rows[1]))
    assert kpi["id"] == "'=HYPERLINK(\"http://x\",\"y\")"
    assert (kpi["actual"], kpi["attainment"]) == ("-5.50", "-0.5500")  # numbers, not formulas
    assert rows[2][3:5] == ["owner", "'@ana"]
    assert rows[3][3:5] == ["contribution:@ana", "'+cmd"]
    assert rows[3][-1] == "-0"
