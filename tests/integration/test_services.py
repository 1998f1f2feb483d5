"""Round trips through the real services the launchers in agents/runtime start."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import defaultdict

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from prometheus_client import CollectorRegistry, Counter, start_http_server

from kpimon.agents.runtime import ServiceStartError, free_port, wait_for_port
from kpimon.agents.runtime.apache_kafka import fetch_jars, pinned_version
from tests.launchers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

N_RECORDS = 1000
N_KEYS = 50


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _records() -> list[tuple[bytes, bytes]]:
    return [(f"user-{i % N_KEYS}".encode(), f"event-{i}".encode()) for i in range(N_RECORDS)]


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        await producer.flush()
        for fut in futures:
            await fut  # raises if any record was not acknowledged
    finally:
        await producer.stop()


async def _consume(bootstrap: str, topic: str, expected: int, group_id: str | None, **kw: object) -> list:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **kw,
    )
    await consumer.start()
    received = []
    try:
        deadline = time.monotonic() + 30
        while len(received) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            for batch in batches.values():
                received.extend(batch)
        if group_id is not None:
            await consumer.commit()
            committed = {tp: await consumer.committed(tp) for tp in consumer.assignment()}
            assert sum(committed.values()) == len(received)
    finally:
        await consumer.stop()
    return received


def _check_round_trip(received: list, sent: list[tuple[bytes, bytes]], partitions: int) -> None:
    assert len(received) == len(sent)
    assert sorted((r.key, r.value) for r in received) == sorted(sent)
    key_partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in received:
        key_partitions[r.key].add(r.partition)
    assert all(len(p) == 1 for p in key_partitions.values()), "a key landed on two partitions"
    assert {r.partition for r in received} == set(range(partitions))
    # per partition, offsets are contiguous from 0 and values keep production order per key
    by_partition: dict[int, list] = defaultdict(list)
    for r in received:
        by_partition[r.partition].append(r)
    for recs in by_partition.values():
        assert [r.offset for r in recs] == list(range(len(recs)))
    last_seen: dict[bytes, int] = {}
    for r in sorted(received, key=lambda r: (r.partition, r.offset)):
        seq = int(r.value.split(b"-")[1])
        assert seq > last_seen.get(r.key, -1)
        last_seen[r.key] = seq


# --------------------------------------------------------------------- Kafka
def test_kafka_jar_cache_is_warm(kafka) -> None:
    started = time.monotonic()
    libs = fetch_jars()
    assert time.monotonic() - started < 1.0
    assert (libs / f"kafka_2.13-{pinned_version()}.jar").is_file()
    assert kafka.version == pinned_version()


def _create_topic_kafka_python(bootstrap: str, topic: str, partitions: int) -> list[dict]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        result = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        assert [t["error_code"] for t in result["topics"]] == [0], result
        deadline = time.monotonic() + 10
        while True:
            (desc,) = admin.describe_topics([topic])
            parts = desc["partitions"]
            if len(parts) == partitions and all(p["leader_id"] >= 0 for p in parts):
                return parts
            assert time.monotonic() < deadline, desc
            time.sleep(0.05)
    finally:
        admin.close()


async def test_kafka_round_trip_4_partitions(kafka) -> None:
    topic = _topic("svc-kafka")
    parts = await asyncio.to_thread(_create_topic_kafka_python, kafka.bootstrap, topic, 4)
    assert sorted(p["partition_index"] for p in parts) == [0, 1, 2, 3]

    sent = _records()
    await _produce(kafka.bootstrap, topic, sent)
    received = await _consume(kafka.bootstrap, topic, N_RECORDS, group_id=_topic("grp"))
    _check_round_trip(received, sent, partitions=4)


async def test_kafka_restart_keeps_data_and_port(kafka) -> None:
    topic = _topic("svc-restart")
    kafka.create_topic(topic, partitions=2)
    sent = _records()[:100]
    await _produce(kafka.bootstrap, topic, sent)
    bootstrap = kafka.bootstrap
    old_pid = kafka.pid

    await asyncio.to_thread(kafka.restart)

    assert kafka.bootstrap == bootstrap and kafka.pid != old_pid
    assert topic in kafka.list_topics()
    received = await _consume(kafka.bootstrap, topic, len(sent), group_id=None)
    assert sorted((r.key, r.value) for r in received) == sorted(sent)


# --------------------------------------------------------------------- Tansu
async def test_tansu_round_trip(tansu) -> None:
    topic = _topic("svc-tansu")
    tansu.create_topic(topic, partitions=4)
    sent = _records()
    await _produce(tansu.bootstrap, topic, sent)
    # no consumer group: Tansu's group join waits half the session timeout
    received = await _consume(tansu.bootstrap, topic, N_RECORDS, group_id=None)
    _check_round_trip(received, sent, partitions=4)


# --------------------------------------------------------------------- Redis
def test_redis_set_get_and_restart_same_port(redis_server) -> None:
    client = redis_server.client()
    try:
        key = _topic("k")
        assert client.set(key, "1")
        assert client.get(key) == b"1"
        port, old_pid = redis_server.port, redis_server.pid

        redis_server.restart()

        assert redis_server.port == port and redis_server.pid != old_pid
        assert redis_server.url == f"redis://127.0.0.1:{port}/0"
        # the same client object reconnects; nothing was persisted
        assert client.get(key) is None
        assert client.incr(key) == 1
    finally:
        client.close()


def test_redis_outage_then_start_again(redis_server) -> None:
    client = redis_server.client(socket_connect_timeout=0.5)
    try:
        redis_server.stop_process(signal.SIGKILL)
        assert not redis_server.running
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        redis_server.start()
        assert client.ping()
    finally:
        client.close()


def test_startup_failure_raises_with_log_tail() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "yes"])
    with pytest.raises(ServiceStartError) as info:
        server.start()
    message = str(info.value)
    assert "redis exited with code" in message
    assert "no-such-directive" in message  # from redis-server's own log lines
    assert not server.running


# ---------------------------------------------------------------- Prometheus
def test_prometheus_scrapes_prometheus_client(prometheus_factory) -> None:
    registry = CollectorRegistry()
    events = Counter("kpimon_selftest_events", "Events seen by the self-test.", registry=registry)
    events.inc(42)
    port = free_port()
    httpd, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        wait_for_port("127.0.0.1", port, timeout=5)
        prom = prometheus_factory([f"127.0.0.1:{port}"])
        assert prom.url.startswith("http://127.0.0.1:")
        assert prom.wait_for_value("kpimon_selftest_events_total", timeout=20) == 42.0
        assert prom.query_value('up{job="kpimon"}') == 1.0
        assert prom.query("kpimon_selftest_events_total")[0]["metric"]["job"] == "kpimon"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
