"""The dedup store on disk across restarts: an id accepted 6 days of event time ago is still a duplicate."""

from __future__ import annotations

import json
import os
import time

import pytest

from kpimon.agents.core.batch import decode as decode_record
from kpimon.agents.core.engine import EngineConfig
from kpimon.agents.tools import backfill as bf
from kpimon.agents.worker.dedup_store import RocksDedup
from tests.integration.test_pipeline import START
from tests.integration.test_robustness import wait_healthy

pytestmark = pytest.mark.integration

DAY = 86_400_000


def line(event_id: str, user: str, ts: int, kind: str = "login") -> bytes:
    return json.dumps({"event_id": event_id, "user_id": user, "type": kind, "ts": ts}).encode()


def state_log(p) -> list:
    return [decode_record(m.value) for m in p.records(p.topics.state_log)]


def wait_consumed(p, proc, end: int, timeout_s: float = 30) -> list:
    """Until the state log covers the input up to source offset ``end``; its records."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = state_log(p)
        if records and max(r.end for r in records) >= end:
            return records
        assert proc.poll() is None and time.monotonic() < deadline, p.log()
        time.sleep(0.3)


def test_a_redelivered_event_six_days_later_is_a_duplicate_across_kill_and_restart(kafka, pipeline_factory):
    p = pipeline_factory(kafka.bootstrap, partitions=1)
    n = p.produce([line("e1", "u1", START, "signup")] + [line(f"later{i}", f"u{i}", START + 6 * DAY + i * 1000)
                                                       for i in range(20)])
    first = p.start_worker()
    wait_healthy(p, first)
    wait_consumed(p, first, n)
    p.kill(first)  # SIGKILL: the store is reopened as it was last committed

    second = p.start_worker()
    wait_healthy(p, second)
    n += p.produce([line("more1", "u1", START + 6 * DAY + 30_000)])
    wait_consumed(p, second, n)
    bf.stop_worker(second)  # a clean stop
    assert second.returncode == 0, p.log()

    third = p.start_worker()
    wait_healthy(p, third)
    # The first event again, as is and with a later ts: both duplicates, neither late nor counted.
    n += p.produce([line("e1", "u1", START, "signup"), line("e1", "u1", START + 6 * DAY + 40_000, "signup")])
    records = wait_consumed(p, third, n)
    bf.stop_worker(third)
    assert third.returncode == 0, p.log()

    accepted = [ev.event_id for r in records for ev in r.events]
    assert sorted(accepted) == sorted({*accepted}), "an event was applied twice"
    assert accepted.count("e1") == 1
    assert sum(r.duplicates for r in records) == 2
    assert sum(r.late for r in records) == 0

    # The store on disk holds every id, committed up to the end of the state log.
    cfg = EngineConfig.from_settings(p.settings)
    name = f"{p.settings.kafka.topic_prefix}{p.settings.worker.app_id}"
    path = os.path.join(p.settings.worker.state_dir, name, "dedup-0")
    store = RocksDedup.open(path, f"{p.topics.state_log}[0] {cfg.fingerprint}", cfg.dedup_horizon)
    try:
        assert store.position == len(records)
        assert store.seen(["e1", "later0", "more1", "never"]) == [True, True, True, False]
    finally:
        store.close()
