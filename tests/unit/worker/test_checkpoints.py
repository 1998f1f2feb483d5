"""The checkpoint bookkeeping: which state-log records a new machine's dedup store still needs, what may go."""

from __future__ import annotations

import pytest

from kpimon.agents.core.dedup import BUCKET_MS, DedupRule
from kpimon.agents.worker.checkpoints import Commit, deletable, history_after, log_floor

H = BUCKET_MS
DAY = 24 * H


def commit(position: int, max_ts: int, history=(), first_offset: int = 0) -> Commit:
    return Commit("ab" * 32, 1, 10, position, first_offset, max_ts, list(history))


@pytest.mark.parametrize(("history", "newest", "wm", "floor"), [
    # Nothing forgotten yet: the whole log is needed.
    ([], (100, 10 * H), 10 * H, 0),
    # A 7-day horizon: at wm = 8 days the buckets before day 1 are forgotten.
    ([(50, 5 * H), (80, 23 * H)], (100, 2 * DAY), 8 * DAY, 80),
    # The newest checkpoint's own max_ts forgotten too: the log before it is not needed for dedup.
    ([(50, 5 * H)], (100, 10 * H), 30 * DAY, 100),
    # A bucket still remembered stops the floor there, whatever comes later.
    ([(50, 5 * H), (80, 7 * DAY + 1)], (100, 7 * DAY + 2), 8 * DAY, 50),
])
def test_log_floor(history, newest, wm, floor) -> None:
    assert log_floor(commit(*newest, history=history), DedupRule(7 * DAY), wm) == floor


def test_history_keeps_one_checkpoint_per_bucket_the_latest() -> None:
    c = commit(300, 3 * H + 5, history=[(100, 2 * H + 1), (200, 2 * H + 3), (250, 3 * H)])
    assert history_after(c, DedupRule(7 * DAY), 0) == [(200, 2 * H + 3), (300, 3 * H + 5)]


def test_history_stays_small_forgotten_buckets_share_one_entry() -> None:
    rule = DedupRule(DAY)
    c = commit(0, 0)
    for i in range(1, 24 * 30):  # a month of hourly checkpoints
        c = commit(i * 10, i * H, history=history_after(c, rule, i * H))
    assert len(c.history) <= 26  # one day of buckets, plus the latest forgotten one
    floor = log_floor(c, rule, c.max_ts)
    assert floor == max(pos for pos, ts in c.history if rule.bucket(ts) < rule.first_kept(c.max_ts))


def test_deletable_keeps_the_previous_checkpoint_and_the_dedup_horizon() -> None:
    rule = DedupRule(7 * DAY)
    old = commit(100, 1 * H, first_offset=10)
    new = commit(200, 9 * DAY, history=[(100, 1 * H)], first_offset=20)
    assert deletable([new], rule, 9 * DAY) is None  # one checkpoint: nothing to fall back to if deleted
    # wm 9 days: ids of the first hours are forgotten, so the log before the previous checkpoint may go.
    assert deletable([old, new], rule, 9 * DAY) == (100, 10)
    # wm 2 days: they are still remembered: the state log is kept whole, old checkpoints may still go.
    assert deletable([old, new], rule, 2 * DAY) == (0, 10)


class _Settings:
    """The settings the Checkpointer reads."""

    def __init__(self, **worker) -> None:
        from types import SimpleNamespace

        w = {"checkpoints": True, "checkpoint_records": 3, "checkpoint_interval": 3_600_000, **worker}
        self.worker = SimpleNamespace(**w)
        self.kafka = SimpleNamespace(bootstrap="127.0.0.1:9")


def test_a_checkpoint_is_due_after_n_records_or_t_seconds(monkeypatch) -> None:
    from kpimon.agents.worker import checkpoints as mod
    from kpimon.streams.topics import Topics

    now = [1000.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    ck = mod.Checkpointer(_Settings(), Topics("t.", "app"), DedupRule(DAY))
    assert not ck.due(0, 5)  # a partition not recovered here yet
    ck.resume(0, None, None)
    assert [ck.due(0, 1) for _ in range(7)] == [False, False, True, False, False, True, False]
    assert ck.due(0, 10)  # many records at once
    now[0] += 3601  # the interval passed with a single record
    assert ck.due(0, 1) and not ck.due(0, 1)
    ck.forget(0)
    assert not ck.due(0, 100)
    off = mod.Checkpointer(_Settings(checkpoints=False), Topics("t.", "app"), DedupRule(DAY))
    off.resume(0, None, None)
    assert not off.due(0, 100)


def test_resume_keeps_the_loaded_checkpoint_and_older_ones_not_refused_newer_ones() -> None:
    from kpimon.agents.worker.checkpoints import Checkpointer, Found
    from kpimon.streams.topics import Topics

    found = Found()
    for i, pos in enumerate((100, 200, 300, 400)):
        c = commit(pos, pos)
        c.offset = i * 10
        found.commits.append(c)
    ck = Checkpointer(_Settings(), Topics("t.", "app"), DedupRule(DAY))
    ck.resume(0, found.commits[2], found)  # the newest (400) was refused: 300 was loaded
    assert [c.position for c in ck.commits[0]] == [200, 300]
    ck.resume(1, None, found)  # recovered from the log's beginning: nothing to fall back to yet
    assert ck.commits[1] == []


def test_checkpoints_are_written_in_the_background_one_round_at_a_time(monkeypatch) -> None:
    """Polls do not wait for a checkpoint write; one submitted while another is written is dropped (its partition
    is due again at its next record); a failed write is raised by check(), not lost."""
    import asyncio

    from kpimon.agents.worker import checkpoints as mod
    from kpimon.streams.topics import Topics

    gate = asyncio.Event()
    written: list[tuple[int, int]] = []

    async def fake_write(producer, topic, p, data, position, max_ts, history):
        await gate.wait()
        if data == b"boom":
            raise OSError("broker refused the chunk")
        written.append((p, position))
        return commit(position, max_ts)

    monkeypatch.setattr(mod, "write", fake_write)

    async def scenario() -> None:
        ck = mod.Checkpointer(_Settings(checkpoints=True), Topics("t.", "app"), DedupRule(DAY))
        for p in (0, 1, 2):
            ck.resume(p, None, None)
        ck.submit(None, {0: (b"a", 10, 0, 0), 1: (b"b", 20, 0, 0)}, lambda p: p != 1)
        ck.submit(None, {2: (b"c", 30, 0, 0)}, lambda p: True)  # busy: dropped, partition 2 due at once
        assert ck.due(2, 1) and not ck.due(0, 1)
        await asyncio.sleep(0)
        assert written == []  # still writing: nothing waited for it
        ck.check()
        gate.set()
        await ck.drain()
        assert written == [(0, 10)]  # partition 1 was given up meanwhile
        ck.submit(None, {0: (b"boom", 40, 0, 0)}, lambda p: True)
        await asyncio.sleep(0.01)
        with pytest.raises(OSError, match="refused"):
            ck.check()
        ck.check()  # raised once

    asyncio.run(scenario())
