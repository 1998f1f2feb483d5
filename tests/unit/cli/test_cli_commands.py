"""Every command's happy path and its main error paths, on real services where they are cheap.

Redis is a real redis-server (``redis_server``), seeded with the writer's and the
snapshot store's own code; ``kpis`` asks a local HTTP server; only the long-running
parts (faust worker, broker process, demo loop, Kafka producer) are replaced.
Flag precedence is in test_cli.py, CSV neutralisation in test_csv_exports.py and
the backfill's late-event verdict in test_backfill_sort.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import kpimon.config
from kpimon.agents.cli import app, main
from kpimon.agents.cli import ledger as cli_ledger
from kpimon.agents.core.ledger import Book, canonical, content_hash
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.agents.core.periods import Calendar
from kpimon.agents.serving.lua import RESET
from kpimon.agents.serving.snapshots import SnapshotStore
from kpimon.agents.serving.writer import ServingWriter
from kpimon.agents.tools import backfill as bf
from kpimon.agents.tools import demo
from kpimon.agents.worker.app import kpi_evaluator
from kpimon.config.settings import load
from kpimon.streams import admin
from tests.cli_support import StandInWorker, flat, invoke, no_kpimon_environment  # noqa: F401 - the fixture is autouse
from tests.serving_support import START, zone_of

CONFIG_DIR = Path(kpimon.config.__file__).resolve().parent
JAN1 = 1_704_067_200_000
MONTHS = [("2024-01", JAN1, 1_706_745_600_000), ("2024-02", 1_706_745_600_000, 1_709_251_200_000),
          ("2024-03", 1_709_251_200_000, 1_711_929_600_000)]








@pytest.fixture
def run_main(monkeypatch, capsys):
    """The command as installed (``kpimon.agents.cli.main``): (exit code, stdout + stderr).

    An exception escaping ``main`` fails the test: an expected failure is one line, not a traceback.
    """

    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level  # main() quiets it for the whole process: put it back afterwards

    def run(args: list[str]) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["kpimon", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    yield run
    kafka_log.setLevel(level)


def write_config(tmp_path: Path, url: str, prefix: str = "cli:") -> Path:
    cfg = tmp_path / "kpimon.yaml"
    cfg.write_text(f"redis: {{url: '{url}', key_prefix: '{prefix}'}}\nkpis: '{CONFIG_DIR / 'kpis.yaml'}'\n")
    return cfg


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def down_config(tmp_path) -> Path:
    return write_config(tmp_path, f"redis://127.0.0.1:{closed_port()}/0")


def _unique_prefix(request) -> str:
    return f"cli-{request.node.name[:40]}-{id(request)}:"


# ----------------------------------------------------------------------------- worker, broker, send, backfill, demo

def test_worker_reports_a_bad_configuration(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("worker: {web_port: abc}\n")
    result = invoke(["worker", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "configuration error" in result.output
    assert flat(f"{cfg}: worker.web_port: Input should be a valid integer") in flat(result.output)


def test_worker_reports_a_missing_configuration_file(tmp_path):
    cfg = tmp_path / "missing.yaml"
    result = invoke(["worker", "--config", str(cfg)])
    assert result.exit_code == 2
    assert flat(f"{cfg}: cannot read") in flat(result.output)


def test_worker_stops_on_a_topic_with_the_wrong_partition_count(monkeypatch, run_main):
    def mismatch(*args, **kwargs):
        raise admin.TopicMismatch("topic kpimon.events has 3 partitions, the configuration says 4")

    monkeypatch.setattr(admin, "ensure_topics", mismatch)
    code, output = run_main(["worker"])
    assert code == 2
    assert "topic kpimon.events has 3 partitions, the configuration says 4" in output
    assert "Traceback" not in output


def test_broker_help_and_foreground_run(monkeypatch):
    result = invoke(["broker", "--help"])
    assert result.exit_code == 0
    assert "--apache" in result.output and "--port" in result.output

    import signal

    from kpimon.agents.runtime import apache_kafka, tansu

    started = []

    class FakeBroker:
        running = False  # the loop ends at once

        def __init__(self, port: int) -> None:
            self.bootstrap = f"127.0.0.1:{port}"
            started.append((type(self).__name__, port))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeTansu(FakeBroker):
        pass

    class FakeApache(FakeBroker):
        pass

    handlers = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.append(signum))
    monkeypatch.setattr(tansu, "TansuBroker", FakeTansu)
    monkeypatch.setattr(apache_kafka, "ApacheKafka", FakeApache)
    result = invoke(["broker", "--port", "19092"])
    assert result.exit_code == 0, result.output
    assert "KPIMON_BROKER=kafka://127.0.0.1:19092" in flat(result.output)
    result = invoke(["broker", "--apache", "--port", "19093"])
    assert result.exit_code == 0, result.output
    assert started == [("FakeTansu", 19092), ("FakeApache", 19093)]
    assert handlers == [signal.SIGTERM, signal.SIGTERM]


def test_broker_refuses_a_bad_port():
    result = CliRunner().invoke(app, ["broker", "--port", "nine"], env={})
    assert result.exit_code == 2
    assert "--port" in result.output


def test_send_produces_every_line_to_the_events_topic(tmp_path, monkeypatch):
    events = tmp_path / "events.jsonl"
    events.write_text('{"event_id": "e1", "user_id": "u1", "type": "login", "ts": 1}\nnot json\n')
    calls = {}

    def ensure(bootstrap, topics, partitions, **kwargs):
        calls["ensure"] = (bootstrap, topics.events, partitions)
        return partitions

    def produce(bootstrap, topic, lines, progress=None):
        calls["produce"] = (bootstrap, topic, list(lines))
        if progress is not None:
            progress(len(calls["produce"][2]))
        return len(calls["produce"][2])

    monkeypatch.setattr(admin, "ensure_topics", ensure)
    monkeypatch.setattr(admin, "produce_lines", produce)
    result = invoke(["send", str(events), "--broker", "kafka://broker.example:9093"])
    assert result.exit_code == 0, result.output
    assert calls["ensure"][:2] == ("broker.example:9093", "kpimon.events")
    assert calls["produce"] == ("broker.example:9093", "kpimon.events",
                                [b'{"event_id": "e1", "user_id": "u1", "type": "login", "ts": 1}', b"not json"])
    assert "sent 2 events" in result.output


def test_send_refuses_a_missing_file_and_a_bad_configuration(tmp_path):
    result = CliRunner().invoke(app, ["send", str(tmp_path / "nope.jsonl")], env={})
    assert result.exit_code == 2
    assert "does not exist" in result.output
    events = tmp_path / "events.jsonl"
    events.write_text("{}\n")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kafka: {partitions: many}\n")
    result = invoke(["send", str(events), "--config", str(cfg)])
    assert result.exit_code == 2
    assert flat(f"{cfg}: kafka.partitions") in flat(result.output)


def test_backfill_reports_a_failed_run_and_a_bad_configuration(tmp_path, monkeypatch):
    history = tmp_path / "history.jsonl"
    history.write_text('{"event_id": "e1", "user_id": "u1", "type": "login", "ts": 1}\n')

    def fail(*args, **kwargs):
        raise bf.BackfillError("the worker did not start")

    monkeypatch.setattr(bf, "run", fail)
    result = CliRunner().invoke(app, ["backfill", str(history)], env={})
    assert result.exit_code == 1
    assert "the worker did not start" in result.output
    assert "Traceback" not in result.output

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("worker: {web_port: abc}\n")
    result = invoke(["backfill", str(history), "--config", str(cfg)])
    assert result.exit_code == 2
    assert flat(f"{cfg}: worker.web_port") in flat(result.output)
    result = CliRunner().invoke(app, ["backfill", str(tmp_path / "nope.jsonl")], env={})
    assert result.exit_code == 2


def test_demo_runs_with_the_given_options(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda settings, **kw: calls.append((settings, kw)))
    result = invoke(["demo", "--config", str(CONFIG_DIR / "demo.yaml"), "--duration", "5", "--rate", "50",
                     "--users", "10"])
    assert result.exit_code == 0, result.output
    (settings, kw), = calls
    assert settings.worker.app_id == "kpimon-demo"
    assert (kw["duration"], kw["rate"], kw["users"]) == (5.0, 50.0, 10)


def test_demo_refuses_a_bad_option(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda settings, **kw: calls.append(kw))
    result = CliRunner().invoke(app, ["demo", "--config", str(CONFIG_DIR / "demo.yaml"), "--rate", "fast"], env={})
    assert result.exit_code == 2
    assert calls == []


# ----------------------------------------------------------------------------- users

@pytest.fixture
def users_config(redis_server, tmp_path, request) -> Path:
    """Three users written by the real ServingWriter: two sleeping (a oldest), one active."""
    prefix = _unique_prefix(request)
    cfg = write_config(tmp_path, redis_server.url, prefix)
    settings = load(cfg)

    async def store() -> None:
        w = ServingWriter(settings)
        sleeping, active = zone_of(settings, "sleeping"), zone_of(settings, "active")
        w.recovered(0, RESET, 0, {})
        w.submit(0, 0, 1, {"b": [START + 5, sleeping, START, "email", 1999],
                           "a": [START + 1, sleeping, None, None, 0],
                           "c": [START + 9, active, START + 9, "organic", -550]})
        assert await w.flush()
        await w.stop()

    asyncio.run(store())
    return cfg


def test_users_get_prints_one_user(users_config):
    result = invoke(["users", "get", "b", "--config", str(users_config)])
    assert result.exit_code == 0, result.output
    user = json.loads(result.stdout)
    assert user == {"user_id": "b", "state": "sleeping", "last_activity": Calendar("UTC").iso(START + 5),
                    "last_activity_ms": START + 5, "signup_ts": Calendar("UTC").iso(START),
                    "signup_ts_ms": START, "channel": "email", "lifetime_revenue": "19.99"}


def test_users_get_reports_an_unknown_user(users_config):
    result = invoke(["users", "get", "nobody", "--config", str(users_config)])
    assert result.exit_code == 1
    assert "unknown user 'nobody'" in result.output
    assert result.stdout == ""


def test_users_at_risk_exports_json_oldest_first(users_config):
    result = invoke(["users", "at-risk", "--state", "sleeping", "--format", "json", "--config", str(users_config)])
    assert result.exit_code == 0, result.output
    users = json.loads(result.stdout)
    assert [(u["user_id"], u["lifetime_revenue"]) for u in users] == [("a", "0.00"), ("b", "19.99")]
    assert "2 users in state sleeping" in result.stderr
    result = invoke(["users", "at-risk", "--state", "sleeping", "--limit", "1", "--format", "json",
                     "--config", str(users_config)])
    assert [u["user_id"] for u in json.loads(result.stdout)] == ["a"]
    result = invoke(["users", "at-risk", "--state", "dead", "--config", str(users_config)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].replace('"', "") == \
        "user_id,state,last_activity,signup_ts,channel,lifetime_revenue"
    assert len(result.stdout.splitlines()) == 1
    assert "0 users in state dead" in result.stderr


@pytest.mark.parametrize("flags", [["--state", "asleep"], ["--state", "sleeping", "--format", "xml"]])
def test_users_at_risk_refuses_a_bad_state_or_format(users_config, flags):
    result = invoke(["users", "at-risk", *flags, "--config", str(users_config)])
    assert result.exit_code == 2
    assert flat("--state must be one of active, silent, sleeping, churned, dead; --format csv or json") in \
        flat(result.output)
    assert result.stdout == ""


def test_users_at_risk_refuses_a_zero_limit(users_config):
    result = CliRunner().invoke(app, ["users", "at-risk", "--state", "sleeping", "--limit", "0",
                                      "--config", str(users_config)], env={})
    assert result.exit_code == 2


def test_users_commands_report_a_bad_configuration(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("redis: {enabled: maybe}\n")
    for args in (["users", "get", "a"], ["users", "at-risk", "--state", "sleeping"]):
        result = invoke([*args, "--config", str(cfg)])
        assert result.exit_code == 2, args
        assert flat(f"{cfg}: redis.enabled") in flat(result.output)


@pytest.mark.parametrize("args", [["users", "get", "a"], ["users", "at-risk", "--state", "sleeping"]])
def test_users_commands_without_redis_fail_in_one_line(down_config, run_main, args):
    code, output = run_main([*args, "--config", str(down_config)])
    assert code != 0
    assert "Traceback" not in output


# ----------------------------------------------------------------------------- kpis

LIVE = {"as_of": "2024-03-14T12:00:00+00:00",
        "kpis": [{"kpi": "revenue", "period": "2024-03", "actual": "61000.00", "target": "135000.00",
                  "attainment": "0.4519", "expected_progress": "0.4500", "projected_attainment": "1.0042",
                  "status": "on_track"}],
        "owners": [{"owner": "acme", "score": "1.0042", "multiplier": "1.0021"}]}


@pytest.fixture(autouse=True)
def _wide_tables(monkeypatch):
    """Tables as wide as their cells (rich cuts cells to fit 80 columns)."""
    monkeypatch.setattr(cli_ledger, "out", Console(width=400))


@pytest.fixture
def worker_at():
    servers: list[StandInWorker] = []

    def start(status: int, body: bytes) -> str:
        servers.append(StandInWorker(body, status))
        return servers[-1].url

    yield start
    for s in servers:
        s.close()


def test_kpis_prints_the_live_scorecard_as_tables(worker_at):
    url = worker_at(200, json.dumps(LIVE).encode())
    result = invoke(["kpis", "--worker", url])
    assert result.exit_code == 0, result.output
    text = flat(result.stdout)
    assert "KPIsasof2024-03-14T12:00:00+00:00" in text
    for cell in ("revenue", "61000.00", "135000.00", "0.4519", "1.0042", "on_track", "acme", "1.0021"):
        assert cell in text, cell
    result = invoke(["kpis", "--worker", url, "--json"])
    assert json.loads(result.stdout) == LIVE


def test_kpis_reports_an_http_error_and_an_unreachable_worker(worker_at):
    url = worker_at(503, b'{"error": "aggregation not running"}')
    result = invoke(["kpis", "--worker", url])
    assert result.exit_code == 1
    assert "503" in result.output and "aggregation not running" in result.output
    gone = f"http://127.0.0.1:{closed_port()}"
    result = invoke(["kpis", "--worker", gone])
    assert result.exit_code == 1
    assert flat(f"cannot reach {gone}") in flat(result.output)
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------- snapshots, scorecard, targets

class Seeded(str):
    """The configuration file's path, with the snapshots stored: "<period>/v<version>" -> snapshot."""

    snapshots: dict[str, dict]


REVENUE = {"2024-01": 100_000_00, "2024-02": 110_000_00, "2024-03": 120_000_00}  # minor units
COHORTS = {"2024-01": {"2023-12": 0, "2024-01": 10}, "2024-02": {"2024-01": 4, "2024-02": 8},
           "2024-03": {"2024-01": 2, "2024-02": 3, "2024-03": 6}}  # signup cohort -> its users active


@pytest.fixture
def ledger_config(redis_server, tmp_path, request) -> Seeded:
    """Three closed months (version 1, and a version 2 of 2024-03), built by the real Book with the
    packaged KPI spec and stored by the real SnapshotStore."""
    prefix = _unique_prefix(request)
    cfg = write_config(tmp_path, redis_server.url, prefix)
    settings = load(cfg)
    book = Book({}, {}, calendar=Calendar(settings.timezone), warning_state="sleeping", decimals=2,
                config_version={"settings": "s", "kpis": "k"}, evaluate=kpi_evaluator(settings.load_kpis(), settings))
    snaps = []
    for label, start, end in MONTHS:
        m = PeriodMetrics()
        m.orders, m.revenue, m.active_users = 3, REVENUE[label], 2
        m.cohorts = COHORTS[label]
        tx = book.on_closed("month", label, start, end, m)
        book.commit(tx)
        snaps += [(s, start) for s in tx.snapshots if s["grain"] == "month"]
    last = snaps[-1][0]
    again = dict(last, version=2, late_events=1)
    again.pop("hash")
    again["hash"] = content_hash(again)
    snaps.append((again, MONTHS[-1][1]))

    async def put() -> None:
        store = SnapshotStore(settings.redis.url, prefix)
        for snap, start in snaps:
            await store.put(snap, canonical(snap), start / 1000)
        for _ in range(10_000):
            if not store.backlog:
                break
            await asyncio.sleep(0.001)
        assert not store.backlog
        assert store._task is not None
        store._task.cancel()
        await asyncio.gather(store._task, return_exceptions=True)
        await store.redis.aclose()

    asyncio.run(put())
    seeded = Seeded(cfg)
    seeded.snapshots = {s["period"] + f"/v{s['version']}": s for s, _ in snaps}
    return seeded


def test_cohorts_reads_the_ledger(ledger_config):
    result = invoke(["cohorts", "--grain", "month", "--format", "json", "--config", str(ledger_config)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"grain": "month", "cohorts": [
        {"cohort": "2024-01", "size": 10, "active": [10, 4, 2]},
        {"cohort": "2024-02", "size": 8, "active": [8, 3]},
        {"cohort": "2024-03", "size": 6, "active": [6]}]}  # 2023-12: no signups, no row
    result = invoke(["cohorts", "--config", str(ledger_config)])  # month and table by default
    assert result.exit_code == 0, result.output
    assert "4(40.0%)" in flat(result.stdout) and "3(37.5%)" in flat(result.stdout)
    result = invoke(["cohorts", "--grain", "month", "--format", "csv", "--config", str(ledger_config)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:3] == ['"cohort","size","offset","active"', '"2024-01","10","0","10"',
                                              '"2024-01","10","1","4"']


def test_cohorts_reads_a_backfill_report_and_refuses_bad_input(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"periods": [
        {"grain": "week", "period": "2024-W01", "metrics": {"cohorts": {"2024-W01": 5}}},
        {"grain": "week", "period": "2024-W03", "metrics": {"cohorts": {"2024-W01": 1, "2024-W03": 0}}},
        {"grain": "month", "period": "2024-01", "metrics": {"cohorts": {"2024-01": 9}}}]}))
    result = invoke(["cohorts", "--grain", "week", "--report", str(report), "--format", "json"])
    assert result.exit_code == 0, result.output
    # week 2 not closed (or not in the report): no value at offset 1, never a 0
    assert json.loads(result.stdout)["cohorts"] == [{"cohort": "2024-W01", "size": 5, "active": [5, None, 1]}]
    assert invoke(["cohorts", "--grain", "day", "--report", str(report)]).exit_code == 2
    assert invoke(["cohorts", "--report", str(report), "--format", "xml"]).exit_code == 2
    report.write_text("[]")
    result = invoke(["cohorts", "--report", str(report)])
    assert result.exit_code == 2 and "notabackfillreport" in flat(result.output)


def test_snapshots_list_shows_every_closed_period(ledger_config):
    result = invoke(["snapshots", "list", "--config", str(ledger_config)])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if "2024-" in line]
    assert [[c for c in r if c not in "│┃|"] for r in rows] == [
        ["month", "2024-01", "1"], ["month", "2024-02", "1"], ["month", "2024-03", "2"]]
    result = invoke(["snapshots", "list", "--grain", "week", "--config", str(ledger_config)])
    assert result.exit_code == 0
    assert "2024-" not in result.stdout


def test_snapshots_show_prints_every_version_or_one(ledger_config):
    result = invoke(["snapshots", "show", "2024-03", "--config", str(ledger_config)])
    assert result.exit_code == 0, result.output
    versions = json.loads(result.stdout)
    assert [v["version"] for v in versions] == [1, 2]
    assert versions == [ledger_config.snapshots["2024-03/v1"], ledger_config.snapshots["2024-03/v2"]]
    result = invoke(["snapshots", "show", "2024-03", "--version", "1", "--config", str(ledger_config)])
    assert [v["hash"] for v in json.loads(result.stdout)] == [ledger_config.snapshots["2024-03/v1"]["hash"]]


@pytest.mark.parametrize("args", [["2023-12"], ["2024-03", "--version", "7"], ["2024-W11"]])
def test_snapshots_show_reports_an_unknown_period_or_version(ledger_config, args):
    result = invoke(["snapshots", "show", *args, "--config", str(ledger_config)])
    assert result.exit_code == 1
    assert f"no snapshot for {args[0]}" in result.output
    assert result.stdout == ""


def test_snapshots_export_writes_the_latest_version(ledger_config):
    result = invoke(["snapshots", "export", "2024-03", "--config", str(ledger_config)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == ledger_config.snapshots["2024-03/v2"]
    result = invoke(["snapshots", "export", "2024-02", "--format", "csv", "--config", str(ledger_config)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith('"period","version","hash"')
    assert any(line.startswith('"2024-02","1","sha256:') and '"kpi","revenue","110000.00"' in line for line in lines)


def test_snapshots_export_refuses_a_bad_format_and_an_unknown_period(ledger_config):
    result = invoke(["snapshots", "export", "2024-03", "--format", "xml", "--config", str(ledger_config)])
    assert result.exit_code == 2
    assert "--format must be json or csv" in result.output
    assert result.stdout == ""
    result = invoke(["snapshots", "export", "2023-12", "--config", str(ledger_config)])
    assert result.exit_code == 1
    assert "no snapshot for month 2023-12" in result.output


def test_scorecard_prints_an_owners_contributions_and_multiplier(ledger_config):
    result = invoke(["scorecard", "--owner", "acme", "--period", "2024-01", "--config", str(ledger_config)])
    assert result.exit_code == 0, result.output
    snap = ledger_config.snapshots["2024-01/v1"]
    acme = next(o for o in snap["owners"] if o["owner"] == "acme")
    text = flat(result.stdout)
    assert f"score{acme['score']}bonusmultiplier{acme['multiplier']}" in text
    assert "acme—2024-01(snapshotv1" in text
    for c in acme["contributions"]:
        assert c["kpi"] in text and c["contribution"] in text


@pytest.mark.parametrize("owner, period, message", [
    ("zoe", "2024-01", "owner 'zoe' has no score in 2024-01"),
    ("acme", "2023-12", "no snapshot for month 2023-12"),
])
def test_scorecard_reports_an_unknown_owner_or_period(ledger_config, owner, period, message):
    result = invoke(["scorecard", "--owner", owner, "--period", period, "--config", str(ledger_config)])
    assert result.exit_code == 1
    assert message in result.output
    assert result.stdout == ""


def test_targets_suggest_proposes_the_next_months_target(ledger_config):
    result = invoke(["targets", "suggest", "--kpi", "revenue", "--config", str(ledger_config)])
    assert result.exit_code == 0, result.output
    # mean of 100000, 110000, 120000 less 10 %, for the month after the last closed one
    assert result.stdout == ('# revenue: mean of the last 3 period(s) 110000.0000, -10 % (higher is better)\n'
                             'target:\n  "2024-04": 99000.00\n')
    result2 = invoke(["targets", "suggest", "--kpi", "revenue", "-n", "1", "--haircut", "0",
                      "--config", str(ledger_config)])
    assert result2.exit_code == 0, result2.output
    assert result2.stdout == ('# revenue: mean of the last 1 period(s) 120000.0000, -0 % (higher is better)\n'
                              'target:\n  "2024-04": 120000.00\n')


def test_targets_suggest_reports_an_unknown_kpi_and_a_missing_history(ledger_config, redis_server, tmp_path):
    result = invoke(["targets", "suggest", "--kpi", "nope", "--config", str(ledger_config)])
    assert result.exit_code == 2
    assert "no KPI 'nope' in the spec" in result.output
    result = invoke(["targets", "suggest", "--kpi", "churn_warnings", "--seasonal", "2024-01",
                     "--config", str(ledger_config)])
    assert result.exit_code == 1
    assert "seasonal reference 2024-01 needs closed periods before it" in result.output
    (tmp_path / "empty").mkdir()
    empty = write_config(tmp_path / "empty", redis_server.url, "cli-empty-ledger:")
    result = invoke(["targets", "suggest", "--kpi", "revenue", "--config", str(empty)])
    assert result.exit_code == 1
    assert "no closed month snapshot has a value for revenue" in result.output
    assert result.stdout == ""


@pytest.mark.parametrize("args", [
    ["snapshots", "list"], ["snapshots", "show", "2024-01"], ["snapshots", "export", "2024-01"],
    ["scorecard", "--owner", "acme", "--period", "2024-01"], ["targets", "suggest", "--kpi", "revenue"],
])
def test_ledger_commands_without_redis_fail_in_one_line(down_config, run_main, args):
    code, output = run_main([*args, "--config", str(down_config)])
    assert code != 0
    assert "Traceback" not in output
