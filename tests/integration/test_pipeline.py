"""The real pipeline on real Apache Kafka: backfill exactness, crash exactness, dead letters, /metrics."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from kpimon.agents.tools import backfill as bf
from kpimon.agents.tools.datasets import generate
from kpimon.streams import topics as wire
from kpimon.streams.events import Decoder, Rejected
from tests.integration.conftest import by_period
from tests.reference import reference_report

pytestmark = pytest.mark.integration

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z
DAY = 86_400_000


def good_events(lines: list[bytes]) -> list[dict]:
    dec = Decoder()
    out = []
    for line in lines:
        try:
            dec.decode(line)
        except Rejected:
            continue
        out.append(orjson.loads(line))
    return out


def until_after(lines: list[bytes], days: int = 0) -> int:
    return max(e["ts"] if isinstance(e["ts"], int) else Decoder().decode(orjson.dumps(e)).ts
               for e in good_events(lines)) + days * DAY


def test_backfill_equals_batch_computation_from_the_definitions(kafka, tmp_path):
    lines = list(generate(20_000, start_ms=START, seed=11, users=750, duplicate_ratio=0.01))
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    from kpimon.config.settings import from_mapping

    settings = from_mapping({"kafka": {"partitions": 4}}, "<test>", env={})
    until = until_after(lines, days=120)
    report = bf.run(str(path), settings, until=str(until), broker=kafka.bootstrap, partitions=4, timeout_s=300)

    expected = reference_report(good_events(lines), settings, until)
    got = by_period(report)
    assert set(got) == set(expected)
    mismatched = [k for k in expected if got[k] != expected[k]]
    assert not mismatched, f"{len(mismatched)} periods differ, first {mismatched[0]}: " \
                           f"{got[mismatched[0]]} != {expected[mismatched[0]]}"
    months = [k for k in got if k[0] == "month"]
    assert len(months) >= 6  # a real multi-month history, including lifecycle aging after the data
    assert report["events"]["duplicates"] > 0
    assert report["events"]["accepted"] + report["events"]["duplicates"] == len(lines)


def _state_log_records(bootstrap: str, topic: str, partitions: int) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


def test_sigkill_mid_stream_then_restart_gives_the_identical_report(kafka, pipeline_factory):
    lines = list(generate(60_000, start_ms=START, seed=12, users=2000, duplicate_ratio=0.005))
    until = until_after(lines, days=100)
    p = pipeline_factory(kafka.bootstrap, worker={"batch_max_records": 300})
    p.produce(lines)
    p.mark(until)
    first = p.start_worker()
    deadline = time.monotonic() + 120
    while _state_log_records(kafka.bootstrap, p.topics.state_log, p.partitions) < 40:
        assert time.monotonic() < deadline, p.log()
        assert first.poll() is None, p.log()
        time.sleep(0.05)
    p.kill(first)
    # The kill really landed mid-stream: the aggregate watermark had not reached the end.
    partial = bf.PeriodsReader(kafka.bootstrap, p.topics.periods)
    partial.poll(500)
    partial.close()
    assert partial.watermark is None or partial.watermark.watermark < until

    p.start_worker()
    report = p.report(until, timeout_s=300)

    expected = reference_report(good_events(lines), p.settings, until)
    assert by_period(report) == expected
    dups = len(lines) - len({e["event_id"] for e in good_events(lines)})
    assert report["events"] == {"accepted": len(lines) - dups, "rejected": 0, "duplicates": dups, "late": 0}


BAD = [
    (b"not json at all", "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'{"user_id": "u-bad", "type": "login", "ts": 1704067200000}', "missing_field"),
    (b'{"event_id": "", "user_id": "u-bad", "type": "login", "ts": 1704067200000}', "invalid_field"),
    (b'{"event_id": "b1", "user_id": "u-bad", "type": "login", "ts": "yesterday"}', "bad_timestamp"),
    (b'{"event_id": "b2", "user_id": "u-bad", "type": "login", "ts": "2024-01-02T00:00:00"}', "bad_timestamp"),
    (b'{"event_id": "b3", "user_id": "u-bad", "type": "purchase", "ts": 1704067200000, "amount": "-5"}',
     "bad_amount"),
    (b'{"event_id": "b4", "user_id": "u-bad", "type": "purchase", "ts": 1704067200000, "amount": "abc"}',
     "bad_amount"),
    (b'{"event_id": "b5", "user_id": "u-bad", "type": "purchase", "ts": 1704067200000}', "missing_field"),
    (b'{"event_id": "b6", "user_id": "u-bad", "type": "login", "ts": 1704067200000, "pad": "'
     + b"x" * 70_000 + b'"}', "too_large"),
]


def test_bad_lines_land_in_the_dlq_with_reasons_and_every_good_event_counts(kafka, pipeline_factory):
    good = list(generate(3000, start_ms=START, seed=13, users=200))
    lines = list(good)
    for i, (line, _) in enumerate(BAD):
        lines.insert((i + 1) * 250, line)
    until = until_after(good, days=40)
    p = pipeline_factory(kafka.bootstrap)
    p.produce(lines)
    p.mark(until)
    p.start_worker()
    report = p.report(until)

    assert report["events"]["rejected"] == len(BAD)
    assert report["events"]["accepted"] == len(good_events(good))
    assert by_period(report) == reference_report(good_events(good), p.settings, until)

    dlq = p.records(p.topics.dlq)
    assert len(dlq) == len(BAD)
    by_value = {rec.value: dict(rec.headers) for rec in dlq}
    for line, reason in BAD:
        headers = by_value[line]  # the original bytes are kept
        assert headers[wire.H_REASON].decode() == reason, (line[:80], headers)
        assert headers[wire.H_DETAIL]
        src = int(headers[wire.H_PARTITION]), int(headers[wire.H_OFFSET])
        original = [r for r in p.records(p.topics.events) if (r.partition, r.offset) == src]
        assert original and original[0].value == line

    # The worker's /metrics agrees, and promtool accepts the exposition.
    text = urllib.request.urlopen(f"{p.web_url}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    for reason in {r for _, r in BAD}:
        want = sum(1 for _, r in BAD if r == reason)
        assert samples[("kpimon_events_rejected_total", (("reason", reason),))] == want
    assert sum(v for (name, _), v in samples.items() if name == "kpimon_events_total") == len(good_events(good))
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    label_values = {v for _, labels in samples for _, v in labels}
    assert not label_values & {e["user_id"] for e in good_events(good)}  # no user ids in labels
