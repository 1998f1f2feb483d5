"""Recovery re-publishes every period the replayed records closed, not only the last record's.

A worker writes a poll's state-log records, then publishes what they closed.
Killed in between, it leaves durable records whose closed periods never left;
one poll can hold several records of a partition (input over RECORD_BYTES, a
watermark marker), so the recovering owner must re-publish what *each* of the
replayed records closed, or the aggregator closes those periods without this
partition's numbers.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from kpimon.agents.core.batch import Record
from kpimon.agents.core.dedup import NoDedup
from kpimon.agents.core.engine import EngineConfig
from kpimon.agents.worker import recovery
from tests.factories import DAY, settings_factory
from tests.pure_pipeline import closed_state, replay_records, run_pipeline

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def _lines(days: int = 12) -> list[bytes]:
    """Two users active every few hours for ``days`` days: many days, weeks and a month close."""
    out = []
    for i in range(days * 6):
        ts = T0 + i * 4 * 3_600_000
        out.append(json.dumps({"event_id": f"e{i}", "user_id": f"u{i % 2}", "type": "login", "ts": ts}).encode())
    return out


def _reader(records: list[Record]):
    async def read(partitions, offsets=None):
        for offset, record in enumerate(records):
            yield 0, offset, record
    return read


@pytest.mark.parametrize("cut", [3, 10, 25, None])
def test_recovery_returns_what_every_replayed_record_closed(cut) -> None:
    settings = settings_factory()
    lines = _lines()
    run = run_pipeline(lines, settings, 1, T0 + 20 * DAY, batch_size=3)
    records = run.records[0][:cut]
    # The periods those records closed, whichever of them closed it.
    _, _, expected = replay_records(records, settings)
    assert sum(1 for r in records[:-1] if r.events) >= 2 and expected  # several records, periods closed

    rec = asyncio.run(recovery.replay_partitions(EngineConfig.from_settings(settings), _reader(records), [0]))[0]
    assert closed_state(rec.closed) == closed_state(expected)
    # In particular the periods closed before the last record, which a last-record-only outbox would lose.
    _, _, before_last = replay_records(records[:-1], settings)
    assert before_last and set(map(repr, closed_state(before_last))) <= set(map(repr, closed_state(rec.closed)))


def test_the_serving_repair_replay_gives_every_user_and_remembers_no_ids() -> None:
    settings = settings_factory()
    run = run_pipeline(_lines(), settings, 1, T0 + 20 * DAY, batch_size=3)
    records = run.records[0]
    engine, _, _ = replay_records(records, settings)
    assert len(engine.dedup_store) == len(_lines())  # a replay that decides on events remembers them all

    cfg = EngineConfig.from_settings(settings)
    users, end = asyncio.run(recovery.replay_users(cfg, _reader(records), 0))
    assert end == len(records)
    assert {uid: (v[0], v[1], v[4]) for uid, v in users.items()} == {
        uid: (last, zone, engine.lifetime.get(uid, 0)) for uid, (zone, last, _, _) in engine.users_state().items()}
    rec = asyncio.run(recovery.replay_partitions(cfg, _reader(records), [0],
                                                 stores=lambda _: NoDedup(cfg.dedup_horizon)))[0]
    assert len(rec.engine.dedup_store) == 0 and rec.engine.users_state() == engine.users_state()
