"""Topic administration and producing tools (kafka-python, synchronous).

Used by the CLI (``send``, ``backfill``), tests and
benchmarks; the worker calls :func:`ensure_topics` in a thread at start-up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from kpimon.errors import EXIT_CONFIG, BrokerUnavailable, KpimonError
from kpimon.streams.topics import WATERMARK_HEADER, Topics

WAIT_S = 30.0  # the worker at start-up: how long to wait for a broker that is still starting
CLI_WAIT_S = 5.0  # a command (kpimon send): how long to try before saying the broker is unreachable
# What a client raises when nobody answers (kafka-python 2.x: NoBrokersAvailable; 3.x: KafkaTimeoutError
# "Unable to bootstrap"); looked up by name because 3.x has no NoBrokersAvailable.
_UNREACHABLE: tuple[type[BaseException], ...] = (OSError, *(
    getattr(kafka_errors, n) for n in ("NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError")
    if hasattr(kafka_errors, n)))


def _bootstrap_opts(cls: Any, timeout_s: float) -> dict[str, int]:
    """The client option that bounds the first connection: kafka-python 3 bootstraps for
    ``bootstrap_timeout_ms`` (30 s by default) in the constructor; 2.x probes the API version for
    ``api_version_auto_timeout_ms`` and raises NoBrokersAvailable."""
    ms = max(500, int(timeout_s * 1000))
    key = "bootstrap_timeout_ms" if "bootstrap_timeout_ms" in cls.DEFAULT_CONFIG else "api_version_auto_timeout_ms"
    return {key: ms}


def unreachable(bootstrap: str, exc: BaseException) -> BrokerUnavailable:
    """The one message for a broker that cannot be reached."""
    name, text = type(exc).__name__, str(exc)
    detail = text if text.startswith(name) else f"{name}: {text}" if text else name
    return BrokerUnavailable(f"cannot reach the broker at {bootstrap}: {detail}")


def _admin(bootstrap: str, wait_s: float = WAIT_S) -> KafkaAdminClient:
    """An admin client; retries for ``wait_s``, then :class:`BrokerUnavailable` if the broker cannot be reached."""
    deadline = time.monotonic() + wait_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="kpimon-admin", request_timeout_ms=15000,
                                    **_bootstrap_opts(KafkaAdminClient, min(remaining, wait_s)))
        except _UNREACHABLE as exc:
            if time.monotonic() > deadline:
                raise unreachable(bootstrap, exc) from exc
            time.sleep(0.2)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class TopicMismatch(KpimonError, RuntimeError):
    """An existing topic has the wrong partition count; the message is one line naming it (exit status 2)."""

    exit_code = EXIT_CONFIG


def ensure_topics(bootstrap: str, topics: Topics, partitions: int,
                  extra: Mapping[str, tuple[int, Mapping[str, str]]] | None = None, wait_s: float = WAIT_S) -> int:
    """Create missing topics, verify every partition count; return the partition count of the events topic.

    The state log gets the events topic's partition count (partition *p* of the
    log belongs to partition *p* of the input); the outputs get one partition.
    ``extra`` maps further topic names (the faust Tables' changelogs) to their
    partition count and topic configs.  A topic that exists with another
    partition count than wanted raises :class:`TopicMismatch`: nothing is changed.
    A broker that cannot be reached within ``wait_s`` raises :class:`BrokerUnavailable`.
    """
    admin = _admin(bootstrap, wait_s)
    try:
        existing = set(admin.list_topics())
        events_parts = partitions
        if topics.events in existing:
            events_parts = _partition_counts(admin, [topics.events])[topics.events]
        wanted = {topics.events: events_parts, topics.state_log: events_parts, topics.checkpoints: events_parts}
        for name in topics.single_partition():
            wanted[name] = 1
        # The state log and the checkpoints are the source of truth for recovery: the broker never deletes
        # from them; the worker deletes what a newer verified checkpoint made redundant (agents/worker/checkpoints.py).
        keep = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
        configs = {topics.state_log: dict(keep), topics.checkpoints: dict(keep)}
        for name, (n, cfg) in (extra or {}).items():
            wanted[name] = n
            configs[name] = dict(cfg)
        new = [NewTopic(name, n, 1, topic_configs=configs.get(name, {})) for name, n in wanted.items()
               if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + 30
        while True:  # wait until metadata shows every topic
            have = set(admin.list_topics())
            if all(name in have for name in wanted):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics not visible after creation: {sorted(set(wanted) - have)}")
            time.sleep(0.1)
        # Verify them all, including the ones just created: another client (or a
        # broker's auto-creation) may have created one first with other counts.
        actual = _partition_counts(admin, list(wanted))
        for name, n in wanted.items():
            if actual[name] != n:
                why = f" (as {topics.events})" if name in (topics.state_log, topics.checkpoints) else ""
                raise TopicMismatch(f"topic {name} has {actual[name]} partitions, expected {n}{why}; "
                                    "kpimon does not change existing topics (docs/operations.md#topics)")
        return events_parts
    finally:
        admin.close()


def _partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    """The partition count of each existing topic (waits briefly for metadata to show partitions)."""
    deadline = time.monotonic() + 30
    while True:
        counts = {}
        for desc in admin.describe_topics(names):
            if desc.get("error_code", 0) == 0 and desc.get("partitions"):
                counts[desc["name"]] = len(desc["partitions"])
        if len(counts) == len(set(names)):
            return counts
        if time.monotonic() > deadline:
            raise RuntimeError(f"no partitions for {sorted(set(names) - set(counts))}")
        time.sleep(0.1)


def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    admin = _admin(bootstrap)
    try:
        existing = set(admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            admin.delete_topics(doomed)
    finally:
        admin.close()


def user_key(line: bytes) -> bytes | None:
    """The partition key of a raw event line: its ``user_id``, if it has one."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict):
        uid = obj.get("user_id")
        if isinstance(uid, str):
            return uid.encode()
    return None


def producer(bootstrap: str) -> KafkaProducer:
    try:
        return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=512 * 1024,
                             max_request_size=16 * 1024 * 1024)
    except _UNREACHABLE as exc:
        raise unreachable(bootstrap, exc) from exc


def produce_lines(bootstrap: str, topic: str, lines: Iterable[bytes], progress=None) -> int:
    """Produce raw JSON lines keyed by user_id (bad lines too: the worker dead-letters them)."""
    prod = producer(bootstrap)
    n = 0
    try:
        for line in lines:
            prod.send(topic, value=line, key=user_key(line))
            n += 1
            if progress is not None and n % 5000 == 0:
                progress(5000)
        prod.flush()
        if progress is not None:
            progress(n % 5000)
    finally:
        prod.close()
    return n


def send_watermark(bootstrap: str, topic: str, partitions: int, watermark_ms: int) -> None:
    """Write a watermark marker into every partition of the events topic."""
    prod = producer(bootstrap)
    try:
        for p in range(partitions):
            prod.send(topic, value=b"", partition=p, headers=[(WATERMARK_HEADER, str(watermark_ms).encode())])
        prod.flush()
    finally:
        prod.close()


def read_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        for line in fh:
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line


def consume_all(bootstrap: str, topic: str, timeout_s: float = 1.0) -> list:
    """Every record of a topic from the beginning (tests and reports)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=int(timeout_s * 1000))
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        return list(consumer)
    finally:
        consumer.close()
