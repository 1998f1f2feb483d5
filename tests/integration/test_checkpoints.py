"""Checkpoints on real Kafka: the state log is truncated, a SIGKILL and restarts give the identical report,
a corrupted newest checkpoint falls back to the previous one, and lost checkpoints are refused loudly."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiokafka import AIOKafkaProducer
from kafka import KafkaConsumer, TopicPartition

from kpimon.agents.tools import backfill as bf
from kpimon.agents.tools.datasets import generate
from kpimon.agents.worker import checkpoints
from tests.integration.conftest import by_period
from tests.integration.test_pipeline import START, good_events, until_after
from tests.reference import reference_report

pytestmark = pytest.mark.integration


def _offsets(bootstrap: str, topic: str, partitions: int) -> tuple[list[int], list[int]]:
    """(first offsets, end offsets) of each partition of ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        firsts, ends = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        return [firsts[tp] for tp in tps], [ends[tp] for tp in tps]
    finally:
        consumer.close()


def _wait(cond, proc, p, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, p.log()
        assert proc.poll() is None, p.log()
        time.sleep(0.05)


def _report_equals_reference(p, lines, until) -> dict:
    report = p.report(until, timeout_s=300)
    got, want = by_period(report), reference_report(good_events(lines), p.settings, until)
    dups = len(lines) - len({e["event_id"] for e in good_events(lines)})
    events = {"accepted": len(lines) - dups, "rejected": 0, "duplicates": dups, "late": 0}
    # On a mismatch, say where: the periods that differ, the event tally, and the workers' logs.
    wrong = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
    if wrong or report["events"] != events:
        _dump_topics(p)
    assert not wrong and report["events"] == events, (list(wrong.items())[:3], report["events"], events, p.log())
    return report


def _dump_topics(p) -> None:
    """On a mismatch: the partials and periods topics, record by record, next to the workers' logs."""
    for name in ("partials", "periods"):
        with open(os.path.join(p.workdir, f"{name}.txt"), "w") as fh:
            for r in p.records(getattr(p.topics, name)):
                fh.write(f"{r.partition} {r.offset} {r.timestamp} {r.key!r} {r.value!r}\n")


@pytest.fixture(scope="module")
def history():
    # ~8 months of event time: the dedup horizon (7d) is passed many times over, so the log can be cut.
    lines = list(generate(30_000, start_ms=START, seed=31, users=1500, duplicate_ratio=0.005))
    return lines, until_after(lines, days=100)


def _checkpointing(kafka, pipeline_factory, history, partitions: int):
    """A deployment with the history produced that checkpoints every few records, and its first worker."""
    lines, until = history
    p = pipeline_factory(kafka.bootstrap, partitions=partitions,
                         worker={"batch_max_records": 200, "checkpoints": True, "checkpoint_records": 8,
                                 "checkpoint_interval": "2s"})
    p.produce(lines)
    p.mark(until)
    return p, p.start_worker()


def test_truncated_log_sigkill_and_restart_give_the_identical_report(kafka, pipeline_factory, history) -> None:
    lines, until = history
    p, first = _checkpointing(kafka, pipeline_factory, history, 2)
    # Run until the state log was really cut (records deleted before a checkpoint), then SIGKILL.
    _wait(lambda: min(_offsets(kafka.bootstrap, p.topics.state_log, 2)[0]) > 0, first, p)
    p.kill(first)
    partial = bf.PeriodsReader(kafka.bootstrap, p.topics.periods)
    partial.poll(500)
    partial.close()
    assert partial.watermark is None or partial.watermark.watermark < until  # the kill landed mid-stream

    second = p.start_worker()
    _report_equals_reference(p, lines, until)
    firsts, ends = _offsets(kafka.bootstrap, p.topics.state_log, 2)
    assert all(f > 0 for f in firsts) and sum(ends) - sum(firsts) < sum(ends) // 2, (firsts, ends)
    assert p.logged("restored"), p.log()
    # A clean stop and a third start: recovery from the newest checkpoint, same numbers.
    bf.stop_worker(second)
    p.start_worker()
    _report_equals_reference(p, lines, until)


def test_a_second_sigkill_soon_after_the_restart_still_gives_the_identical_report(kafka, pipeline_factory,
                                                                                  history) -> None:
    """Killed once mid-stream, and again about a second after the restart (recovery done, its first
    batches and re-published periods in flight): the third worker's report is the reference's."""
    lines, until = history
    p, first = _checkpointing(kafka, pipeline_factory, history, 2)
    _wait(lambda: min(_offsets(kafka.bootstrap, p.topics.state_log, 2)[0]) > 0, first, p)
    p.kill(first)
    second = p.start_worker()
    _wait(lambda: "recovered 2 partitions" in p.worker_log(1), second, p, timeout_s=60)
    time.sleep(1.0)
    p.kill(second)
    p.start_worker()
    _report_equals_reference(p, lines, until)


async def _append_torn_commit(bootstrap: str, topic: str, partition: int, position: int) -> None:
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await prod.start()
    try:
        commit = checkpoints.Commit("00" * 32, 3, 100, position, 0, 0, [])
        await prod.send_and_wait(topic, checkpoints._commit_enc.encode(commit), partition=partition,
                                 headers=[(checkpoints.H_DIGEST, commit.digest.encode()),
                                          (checkpoints.H_PART, b"commit")])
    finally:
        await prod.stop()


def test_a_corrupted_checkpoint_falls_back_and_lost_ones_are_refused(kafka, pipeline_factory, history) -> None:
    lines, until = history
    p, first = _checkpointing(kafka, pipeline_factory, history, 1)
    _report_equals_reference(p, lines, until)
    _wait(lambda: _offsets(kafka.bootstrap, p.topics.state_log, 1)[0][0] > 0, first, p)
    p.kill(first)

    # The newest checkpoint's commit names chunks that are not there: refused, the previous one is used.
    _, ends = _offsets(kafka.bootstrap, p.topics.state_log, 1)
    asyncio.run(_append_torn_commit(kafka.bootstrap, p.topics.checkpoints, 0, ends[0]))
    second = p.start_worker()
    _report_equals_reference(p, lines, until)
    _wait(lambda: p.logged("trying an older one"), second, p, timeout_s=30)
    p.kill(second)

    # Every checkpoint lost while the log is cut: the worker refuses to start rather than count from nothing.
    _, cp_ends = _offsets(kafka.bootstrap, p.topics.checkpoints, 1)
    asyncio.run(checkpoints.delete_before(kafka.bootstrap, {(p.topics.checkpoints, 0): cp_ends[0]}))
    third = p.start_worker()
    assert third.wait(timeout=120) != 0
    assert p.logged("no intact checkpoint covers"), p.log()
