"""A real worker against faults: a failed loop makes it exit 1; poison pills only reach the DLQ."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from kpimon.agents.core.batch import Record
from kpimon.agents.core.batch import encode as encode_record
from kpimon.agents.runtime.ports import free_port
from kpimon.agents.tools.datasets import generate
from kpimon.streams import admin
from kpimon.streams import topics as wire
from kpimon.streams.events import Reason
from kpimon.streams.topics import Topics
from tests.integration.conftest import by_period
from tests.integration.test_pipeline import START, good_events, until_after
from tests.reference import reference_report

pytestmark = pytest.mark.integration


def healthz(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_healthy(p, proc, timeout_s: float = 90) -> dict:
    """Until /healthz answers 200 with every partition recovered (the worker runs every loop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, p.log()
        try:
            status, body = healthz(p.web_url)
            if status == 200 and len(body["partitions"]) == p.partitions:
                return body
        except OSError:
            pass
        assert time.monotonic() < deadline, p.log()
        time.sleep(0.2)


def full_log(p, i: int = 0) -> str:
    with open(os.path.join(p.workdir, f"worker-{i}.log"), errors="replace") as fh:
        return fh.read()


def wait_exit(p, proc, timeout_s: float = 90) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker did not exit after its loop failed\n{p.log()}") from None


def test_a_refused_recovery_on_a_rebalance_stops_a_running_worker_with_exit_code_1(kafka, pipeline_factory):
    p = pipeline_factory(kafka.bootstrap, partitions=2)
    first = p.start_worker()
    assert wait_healthy(p, first)["status"] == "ok"
    # State-log records written under other settings: the next recovery of either partition refuses.
    alien = encode_record(Record(0, 0, None, None, [], {}, 0, 0, "fingerprint-of-other-settings"))
    prod = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    for partition in (0, 1):
        prod.send(p.topics.state_log, alien, partition=partition).get(timeout=30)
    prod.close()
    # A second worker joins: the rebalance makes the running worker recover its partitions again.
    # (faust's app.crash alone left a started worker running, idle, as a zombie.)
    second = p.start_worker(env={"KPIMON_WEB_PORT": str(free_port())})
    assert wait_exit(p, first) == 1
    assert "ingest loop crashed; stopping the worker (exit code 1): StateLogError: state log partition" in full_log(p)
    assert wait_exit(p, second) == 1


def test_an_undecodable_record_on_the_partials_topic_stops_the_worker_with_exit_code_1(kafka, pipeline_factory):
    p = pipeline_factory(kafka.bootstrap, partitions=2)
    worker = p.start_worker()
    body = wait_healthy(p, worker)
    assert body["status"] == "ok" and body["crashes"] == {"ingest": 0, "aggregate": 0, "restate": 0, "faust": 0}

    prod = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    offset = prod.send(p.topics.partials, b"\x00 not a kpimon message", partition=0).get(timeout=30).offset
    prod.close()
    # faust alone would restart the agent past the record and the worker would run on (exit never comes).
    assert wait_exit(p, worker) == 1
    assert (f"aggregate loop crashed; stopping the worker (exit code 1): UndecodableRecord: undecodable record "
            f"at {p.topics.partials}[0]@{offset}") in full_log(p)


NEST = 10_000
PILLS = [
    # valid but for a 20 KB field nested 10,000 deep
    b'{"event_id":"pill-1","user_id":"u-pill","type":"login","ts":1704067200000,"x":'
    + b"[" * NEST + b"]" * NEST + b"}",
    b'{"event_id":"pill-2","user_id":"u-pill","type":"purchase","ts":1704067200000,"amount":"1e999999999"}',
    b'{"event_id":"e\xff1","user_id":"u-pill","type":"login","ts":1704067200000}',  # invalid UTF-8
    b'{"event_id":"pill-4","user_id":"u-pill","type":"purchase","ts":1704067200000,"amount":"1e18"}',
    b'{"event_id":"pill-5","user_id":"u-pill","type":"purchase","ts":1704067200000,"amount":1e400}',
]


def test_poison_pills_land_in_the_dlq_and_the_worker_stays_up_and_counts_every_good_event(kafka, pipeline_factory):
    good = list(generate(2000, start_ms=START, seed=21, users=150))
    lines = list(good)
    for i, pill in enumerate(PILLS):
        lines.insert((i + 1) * 300, pill)
    until = until_after(good, days=40)
    p = pipeline_factory(kafka.bootstrap)
    p.produce(lines)
    p.mark(until)
    worker = p.start_worker()
    report = p.report(until)

    assert worker.poll() is None, p.log()
    status, body = healthz(p.web_url)
    assert status == 200 and body["status"] == "ok", body
    assert report["events"]["accepted"] == len(good_events(good))
    assert report["events"]["rejected"] == len(PILLS)
    assert by_period(report) == reference_report(good_events(good), p.settings, until)

    dlq = {rec.value: dict(rec.headers) for rec in p.records(p.topics.dlq)}
    reasons = {r.value for r in Reason}
    for pill in PILLS:
        assert pill in dlq, pill[:80]
        assert dlq[pill][wire.H_REASON].decode() in reasons
    assert worker.poll() is None, p.log()


def test_an_existing_topic_with_the_wrong_partition_count_stops_the_worker_before_it_starts(kafka, tmp_path):
    topics = Topics(f"t{uuid.uuid4().hex[:8]}.")
    client = KafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    client.create_topics([NewTopic(topics.partials, 4, 1)])
    client.close()
    with pytest.raises(admin.TopicMismatch, match=re.escape(f"topic {topics.partials} has 4 partitions, expected 1")):
        admin.ensure_topics(kafka.bootstrap, topics, 2)

    config = tmp_path / "kpimon.yaml"
    config.write_text(yaml.safe_dump({"kafka": {"broker": f"kafka://{kafka.bootstrap}", "topic_prefix": topics.prefix},
                                      "worker": {"web_port": free_port()}, "redis": {"enabled": False}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPIMON_")}
    done = subprocess.run([sys.executable, "-m", "kpimon", "worker", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [ln for ln in done.stderr.splitlines() if "topic error" in ln]
    assert f"topic {topics.partials} has 4 partitions, expected 1" in line
