"""The serving layer on the real pipeline: Apache Kafka, a `kpimon worker` child process, a real Redis.

Redis is stopped mid-stream and restarted on the same port, either keeping its
data (append-only file) or losing it (no persistence, the launcher's default).
Either way the worker keeps processing, reports the outage, and afterwards
every user's hash and every at-risk set equal a plain computation from the
accepted events.  The outreach export and the API token are checked on the
same run.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

import orjson
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from kpimon.agents.core.batch import decode as decode_record
from kpimon.agents.tools.datasets import generate
from kpimon.streams.events import Decoder
from tests.integration.conftest import Pipeline
from tests.integration.test_pipeline import good_events
from tests.launchers import RedisServer
from tests.reference import accepted_events
from tests.serving_reference import STATES, expected_users

pytestmark = pytest.mark.integration

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z
DAY = 86_400_000
TOKEN = "integration-" + uuid.uuid4().hex
FIELDS = ("state", "last_activity", "signup_ts", "channel", "lifetime_revenue_minor", "lifetime_revenue")


def metrics(p: Pipeline) -> dict[str, float]:
    text = urllib.request.urlopen(f"{p.web_url}/metrics", timeout=10).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        consumer.close()


def reflects(client: redis.Redis, key: str, p: Pipeline, source_ends: dict[int, int]) -> bool:
    """The serving positions (state-log offsets) are at the end of a state log that covers ``source_ends``."""
    log_ends = end_offsets(p.bootstrap, p.topics.state_log, p.partitions)
    if {int(k): int(v) for k, v in client.hgetall(key).items()} != log_ends:
        return False
    consumer = KafkaConsumer(bootstrap_servers=p.bootstrap, enable_auto_commit=False)
    try:
        for part, end in log_ends.items():
            if end == 0:
                if source_ends[part]:
                    return False
                continue
            tp = TopicPartition(p.topics.state_log, part)
            consumer.assign([tp])
            consumer.seek(tp, end - 1)
            last = [m for ms in consumer.poll(timeout_ms=5000).values() for m in ms]
            if not last or decode_record(last[-1].value).end != source_ends[part]:
                return False
        return True
    finally:
        consumer.close()


def wait_for(cond, timeout_s: float, what: str, p: Pipeline) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if cond():
                return
        except (OSError, redis.RedisError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{p.log()}")
        assert p.workers[-1].poll() is None, p.log()  # the current worker is alive
        time.sleep(0.2)


def redis_users(client: redis.Redis, prefix: str) -> dict[str, dict]:
    uids = [k.decode()[len(prefix) + len("user:"):] for k in client.scan_iter(f"{prefix}user:*", count=5000)]
    pipe = client.pipeline(transaction=False)
    for uid in uids:
        pipe.hmget(f"{prefix}user:{uid}", list(FIELDS))
    out = {}
    for uid, vals in zip(uids, pipe.execute()):
        state, last, signup, channel, rev_minor, rev = (v.decode() if v is not None else None for v in vals)
        out[uid] = {"user_id": uid, "state": state, "last_activity": int(last),
                    "signup_ts": int(signup) if signup else None, "channel": channel,
                    "lifetime_revenue_minor": int(rev_minor), "lifetime_revenue": rev}
    return out


def at_risk_sets(client: redis.Redis, prefix: str) -> dict[str, list[tuple[int, str]]]:
    return {s: [(int(score), m.decode()) for m, score in client.zrange(f"{prefix}at-risk:{s}", 0, -1,
                                                                      withscores=True)] for s in STATES}


@pytest.fixture(scope="module", params=["redis-keeps-its-data", "redis-loses-its-data"])
def outage_run(request, kafka, tmp_path_factory):
    """One pipeline run with a Redis outage mid-stream; yields what the tests check."""
    persistent = request.param == "redis-keeps-its-data"
    server = RedisServer(extra_args=["--appendonly", "yes"] if persistent else []).start()
    lines = list(generate(30_000, start_ms=START, seed=31, users=1250, duplicate_ratio=0.005))
    good = good_events(lines)
    dec = Decoder()
    until = max(dec.decode(orjson.dumps(e)).ts for e in good) + DAY  # users 14-30 days inactive are sleeping
    key_prefix = f"t{uuid.uuid4().hex[:8]}:"
    workdir = tmp_path_factory.mktemp(request.param)
    p = Pipeline(kafka.bootstrap, str(workdir), redis={"enabled": True, "url": server.url, "key_prefix": key_prefix},
                 worker={"batch_max_records": 1000})
    client = server.client()
    offsets_key = f"{key_prefix}serving:positions:{p.topics.state_log}"
    try:
        p.start_worker(env={"KPIMON_API_TOKEN": TOKEN})
        half = len(lines) // 2
        p.produce(lines[:half])
        ends = end_offsets(kafka.bootstrap, p.topics.events, p.partitions)
        wait_for(lambda: reflects(client, offsets_key, p, ends), 120, "the serving layer to reflect the first half", p)
        before = len(list(client.scan_iter(f"{key_prefix}user:*", count=5000)))
        assert before > 250  # about 460 of the 1250 users are in Redis when it goes down

        server.stop_process()  # mid-stream: the rest arrives while Redis is down
        p.produce(lines[half:])
        p.mark(until)
        report = p.report(until, timeout_s=180)  # the stream is processed without Redis
        wait_for(lambda: metrics(p)["kpimon_serving_up"] == 0, 30, "the outage to show in /metrics", p)
        during = metrics(p)
        assert during["kpimon_serving_backlog_users"] > 0

        server.start()  # same port; with or without the data written before
        wait_for(lambda: metrics(p)["kpimon_serving_up"] == 1 and metrics(p)["kpimon_serving_backlog_users"] == 0
                 and len(client.hgetall(offsets_key)) == p.partitions, 120, "the serving layer to catch up", p)
        final_ends = end_offsets(kafka.bootstrap, p.topics.events, p.partitions)
        wait_for(lambda: reflects(client, offsets_key, p, final_ends), 60,
                 "the serving layer positions to reach the end of the state log", p)
        accepted = accepted_events(good, p.settings)
        expected = expected_users(accepted, until, p.settings.lifecycle.thresholds, p.settings.money.decimals)
        yield {"p": p, "server": server, "client": client, "prefix": key_prefix, "expected": expected,
               "report": report, "during": during, "persistent": persistent, "before": before}
    finally:
        client.close()
        p.close()
        server.stop()


def test_a_redis_outage_mid_stream_loses_nothing_from_the_serving_layer(outage_run):
    run = outage_run
    p, client, prefix, expected = run["p"], run["client"], run["prefix"], run["expected"]
    assert run["report"]["events"]["late"] == 0
    assert len({u["state"] for u in expected.values()}) == len(STATES)
    got = redis_users(client, prefix)
    assert set(got) == set(expected)
    wrong = [uid for uid in expected if got[uid] != expected[uid]]
    assert not wrong, f"{len(wrong)} users differ, e.g. {got[wrong[0]]} != {expected[wrong[0]]}"
    want_sets = {s: sorted((u["last_activity"], uid) for uid, u in expected.items() if u["state"] == s)
                 for s in STATES}
    assert at_risk_sets(client, prefix) == want_sets
    assert p.logged("serving layer unavailable") and p.logged("caught up"), p.log()
    if not run["persistent"]:
        assert p.logged("rebuilding it from the state log"), p.log()
    final = metrics(p)
    assert final["kpimon_serving_up"] == 1 and final["kpimon_serving_backlog_users"] == 0


def test_the_at_risk_export_lists_exactly_the_sleeping_users(outage_run):
    run = outage_run
    p, expected, server = run["p"], run["expected"], run["server"]
    env = {**os.environ, "KPIMON_REDIS_URL": server.url, "KPIMON_LOGLEVEL": "WARNING"}
    out = subprocess.run([sys.executable, "-m", "kpimon", "users", "at-risk", "--state", "sleeping",
                          "--format", "csv", "--config", p.config_path], capture_output=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr.decode()
    rows = list(csv.DictReader(io.StringIO(out.stdout.decode())))
    sleeping = {uid for uid, u in expected.items() if u["state"] == "sleeping"}
    assert len(sleeping) > 20
    assert [r["user_id"] for r in rows] == sorted(sleeping, key=lambda uid: (expected[uid]["last_activity"], uid))
    for r in rows:
        want = expected[r["user_id"]]
        assert r["state"] == "sleeping"
        assert datetime.fromisoformat(r["last_activity"]).timestamp() * 1000 == want["last_activity"]
        assert r["lifetime_revenue"] == want["lifetime_revenue"]
        assert r["channel"] == (want["channel"] or "")
        if want["signup_ts"] is None:
            assert r["signup_ts"] == ""
        else:
            assert datetime.fromisoformat(r["signup_ts"]).timestamp() * 1000 == want["signup_ts"]


def _get(url: str, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, orjson.loads(err.read() or b"{}")


def test_the_token_is_enforced_on_per_user_endpoints(outage_run):
    run = outage_run
    p, expected = run["p"], run["expected"]
    uid = next(uid for uid, u in expected.items() if u["state"] == "sleeping")
    url = f"{p.web_url}/api/users/{uid}"
    assert _get(url, None)[0] == 401
    assert _get(url, "wrong-" + TOKEN)[0] == 401
    status, body = _get(url, TOKEN)
    assert status == 200
    assert (body["user_id"], body["state"], body["last_activity_ms"], body["lifetime_revenue"]) == (
        uid, "sleeping", expected[uid]["last_activity"], expected[uid]["lifetime_revenue"])
    risk = f"{p.web_url}/api/at-risk?state=sleeping&limit=5"
    assert _get(risk, None)[0] == 401
    status, body = _get(risk, TOKEN)
    assert status == 200 and len(body["users"]) == 5
    assert body["users"][0]["user_id"] == min(
        (u["last_activity"], k) for k, u in expected.items() if u["state"] == "sleeping")[1]


def test_a_worker_killed_with_a_backlog_loses_nothing(kafka, pipeline_factory):
    """SIGKILL while Redis is down (the backlog dies with the worker); the next worker recovers without Redis."""
    with RedisServer(extra_args=["--appendonly", "yes"]) as server:
        lines = list(generate(15_000, start_ms=START, seed=32, users=750))
        good = [orjson.loads(line) for line in lines]
        until = max(Decoder().decode(line).ts for line in lines) + DAY
        key_prefix = f"t{uuid.uuid4().hex[:8]}:"
        p = pipeline_factory(kafka.bootstrap, redis={"enabled": True, "url": server.url, "key_prefix": key_prefix})
        client = server.client()
        offsets_key = f"{key_prefix}serving:positions:{p.topics.state_log}"
        first = p.start_worker()
        p.produce(lines[:5_000])
        ends = end_offsets(kafka.bootstrap, p.topics.events, p.partitions)
        wait_for(lambda: reflects(client, offsets_key, p, ends), 120, "the serving layer to reflect the first part", p)
        server.stop_process()
        p.produce(lines[5_000:])
        p.mark(until)
        p.report(until, timeout_s=180)  # everything is in the state log; the serving backlog only in memory
        assert metrics(p)["kpimon_serving_backlog_users"] > 0
        p.kill(first)
        p.start_worker()  # recovers while Redis is still down: collects every user of its partitions
        wait_for(lambda: p.logged("every user of them will be rewritten"), 120, "the recovery without Redis", p)
        server.start()
        wait_for(lambda: metrics(p)["kpimon_serving_backlog_users"] == 0 and metrics(p)["kpimon_serving_up"] == 1,
                 120, "the serving layer to catch up", p)
        expected = expected_users(accepted_events(good, p.settings), until, p.settings.lifecycle.thresholds)
        got = redis_users(client, key_prefix)
        assert set(got) == set(expected)
        assert [uid for uid in expected if got[uid] != expected[uid]] == []
        final_ends = end_offsets(kafka.bootstrap, p.topics.events, p.partitions)
        wait_for(lambda: reflects(client, offsets_key, p, final_ends), 60,
                 "the serving layer positions to reach the end of the state log", p)
        client.close()
