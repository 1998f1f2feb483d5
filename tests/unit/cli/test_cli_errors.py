"""Every expected failure of the command is one line and an exit code, never a traceback (kpimon.errors)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kpimon.agents.core.formula import FormulaError
from kpimon.agents.runtime.process import ServiceStartError
from kpimon.agents.serving import redis_client
from kpimon.agents.tools.backfill import BackfillError
from kpimon.agents.tools.demo import DemoError
from kpimon.agents.worker.app import UndecodableRecord
from kpimon.agents.worker.recovery import StateLogError
from kpimon.backoff import Backoff
from kpimon.config.settings import ConfigError
from kpimon.errors import BrokerUnavailable, KpimonError, RedisUnavailable
from kpimon.streams import admin
from kpimon.streams.admin import TopicMismatch
from kpimon.streams.events import Rejected
from tests.cli_support import invoke, no_kpimon_environment  # noqa: F401 - the fixture is autouse

ROOT = Path(__file__).resolve().parents[3]






def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def events(tmp_path) -> Path:
    path = tmp_path / "events.jsonl"
    path.write_text('{"user_id": "u1", "type": "signup"}\n')
    return path


# ----------------------------------------------------------------------------- the error base


@pytest.mark.parametrize(("cls", "code"), [
    (ConfigError, 2), (TopicMismatch, 2), (FormulaError, 2),
    (StateLogError, 1), (BackfillError, 1), (ServiceStartError, 1), (UndecodableRecord, 1), (DemoError, 1),
    (BrokerUnavailable, 1), (RedisUnavailable, 1), (Rejected, 1),
])
def test_every_project_error_is_a_kpimon_error_with_its_exit_code(cls, code) -> None:
    assert issubclass(cls, KpimonError)
    assert cls.exit_code == code


def test_errors_keep_the_bases_callers_catch() -> None:
    assert issubclass(FormulaError, ValueError)
    assert issubclass(TopicMismatch, RuntimeError) and issubclass(BackfillError, RuntimeError)
    assert issubclass(ServiceStartError, RuntimeError)
    assert not issubclass(DemoError, SystemExit)  # the command maps it and prints its message
    err = Rejected("bad_json", "x")  # type: ignore[arg-type]
    assert (err.reason, err.detail, str(err)) == ("bad_json", "x", "bad_json: x")


def test_the_error_module_is_pure() -> None:
    code = "import sys, kpimon.errors, kpimon.backoff; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('redis', 'kafka', 'typer', 'rich', 'faust', 'aiokafka')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- the broker


def test_send_to_a_broker_that_is_down_is_one_line(events) -> None:
    port = free_port()
    result = invoke(["send", str(events), "--broker", f"kafka://127.0.0.1:{port}"])
    assert result.exit_code == 1
    assert len(lines(result.output)) == 1, result.output
    assert f"cannot reach the broker at 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_send_to_a_broker_that_is_down_prints_one_line_from_the_real_command(events) -> None:
    """Through ``python -m kpimon``: the client's connection logs are quiet too."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPIMON_")}
    out = subprocess.run([sys.executable, "-m", "kpimon", "send", str(events), "--broker", f"127.0.0.1:{port}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1, out.stderr
    assert out.stdout == ""
    assert lines(out.stderr) == [lines(out.stderr)[0]] and "Traceback" not in out.stderr, out.stderr
    assert f"cannot reach the broker at 127.0.0.1:{port}" in out.stderr


def test_send_gives_up_after_the_command_wait(monkeypatch, events) -> None:
    seen = []

    def down(bootstrap, wait_s=admin.WAIT_S):
        seen.append(wait_s)
        raise admin.unreachable(bootstrap, OSError("refused"))

    monkeypatch.setattr(admin, "_admin", down)
    result = invoke(["send", str(events), "--broker", "kafka://127.0.0.1:1"])
    assert result.exit_code == 1
    assert seen == [admin.CLI_WAIT_S] and admin.CLI_WAIT_S < admin.WAIT_S
    assert lines(result.output) == ["error: cannot reach the broker at 127.0.0.1:1: OSError: refused"]


def test_a_kafka_client_connection_error_is_one_line(monkeypatch, events) -> None:
    from kafka.errors import KafkaConnectionError

    def down(*a, **kw):
        raise KafkaConnectionError("111 ECONNREFUSED")

    monkeypatch.setattr(admin, "ensure_topics", down)
    result = invoke(["send", str(events), "--broker", "kafka://127.0.0.1:1"])
    assert result.exit_code == 1
    assert len(lines(result.output)) == 1 and "cannot reach the broker" in result.output, result.output


def test_a_topic_with_the_wrong_partition_count_exits_2(monkeypatch, events) -> None:
    def mismatch(*a, **kw):
        raise TopicMismatch("topic kpimon.events has 3 partitions, expected 6")

    monkeypatch.setattr(admin, "ensure_topics", mismatch)
    result = invoke(["send", str(events)])
    assert result.exit_code == 2
    assert lines(result.output) == ["error: topic kpimon.events has 3 partitions, expected 6"]


def test_an_unexpected_error_is_not_hidden(monkeypatch, events) -> None:
    """Only expected failures are mapped: a bug still raises (and shows its traceback)."""
    def bug(*a, **kw):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(admin, "ensure_topics", bug)
    with pytest.raises(ZeroDivisionError):
        invoke(["send", str(events)])


# ----------------------------------------------------------------------------- configuration, demo, Redis


def test_a_configuration_error_is_one_line_naming_the_file(tmp_path, events) -> None:
    cfg = tmp_path / "kpimon.yaml"
    cfg.write_text("kafka:\n  partitions: nope\n")
    result = invoke(["send", str(events), "--config", str(cfg)])
    assert result.exit_code == 2
    (line,) = lines(result.output)
    assert line.startswith("configuration error: ") and f"{cfg}: kafka.partitions:" in line


def test_a_demo_error_is_one_line() -> None:
    result = invoke(["demo", "--rate", "-1"])
    assert result.exit_code == 1
    assert lines(result.output) == ["error: demo: --rate and --users must be positive"]


def test_redis_down_is_one_line_without_the_password(tmp_path) -> None:
    cfg = tmp_path / "kpimon.yaml"
    cfg.write_text(f"redis:\n  url: redis://:s3cret@127.0.0.1:{free_port()}/0\n")
    for args in (["snapshots", "list"], ["users", "get", "u1"]):
        result = invoke([*args, "--config", str(cfg)])
        assert result.exit_code == 1, args
        (line,) = lines(result.output)
        assert line.startswith("error: cannot reach Redis at redis://:***@127.0.0.1:"), line
        assert "s3cret" not in result.output


# ----------------------------------------------------------------------------- the Redis factory, the back-off


@pytest.mark.parametrize("use_asyncio", [False, True])
def test_every_redis_client_fails_fast_without_retries(use_asyncio) -> None:
    client = redis_client.client("redis://127.0.0.1:1/0", asyncio=use_asyncio)
    kw = client.connection_pool.connection_kwargs
    assert kw["socket_timeout"] == redis_client.TIMEOUT_S
    assert kw["socket_connect_timeout"] == redis_client.CONNECT_TIMEOUT_S
    assert client.get_retry().get_retries() == 0


def test_redact_keeps_everything_but_the_password() -> None:
    assert redis_client.redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redis_client.redact("redis://app:pw@db:6380/2") == "redis://app:***@db:6380/2"
    assert redis_client.redact("rediss://:pw@[::1]:6379") == "rediss://:***@[::1]:6379"


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    b = Backoff(0.05, cap=1.0)
    assert [b.next() for _ in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.05


def test_backoff_matches_the_loops_it_replaced() -> None:
    """The old loops: ``sleep(d); d = min(d * 2, cap)`` (the first delay is never capped)."""
    for first, cap in ((0.05, 5.0), (0.5, 10.0), (0.5, 30.0), (0.05, 0.01)):
        b, d, got, want = Backoff(first, cap), first, [], []
        for _ in range(12):
            got.append(b.next())
            want.append(d)
            d = min(d * 2, cap)
        assert got == want
