"""RocksDedup (agents/worker/dedup_store.py): the same answers as MemoryDedup, staged commits, wipes, recovery."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpimon.agents.core.batch import Record
from kpimon.agents.core.dedup import BUCKET_MS, MemoryDedup
from kpimon.agents.core.engine import EngineConfig
from kpimon.agents.worker import recovery
from kpimon.agents.worker.dedup_store import RocksDedup, open_partition_store
from tests.factories import settings_factory
from tests.pure_pipeline import FakeRecord, process_all

H = 3 * BUCKET_MS  # a short horizon: buckets go within a few steps
T0 = 1_700_000_000_000 // BUCKET_MS * BUCKET_MS

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(0, 40), max_size=6), st.integers(0, 3 * BUCKET_MS)),
    st.tuples(st.just("seen"), st.lists(st.integers(0, 40), max_size=8)),
    st.tuples(st.just("expire"), st.integers(0, 2 * BUCKET_MS)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("reopen")),
), max_size=60)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=ops)
def test_rocks_gives_the_answers_of_memory(tmp_path_factory, steps):
    """Random add/seen/expire/commit/reopen: the same seen() answers and len as MemoryDedup, where a reopen
    without commit brings back the state of the last commit (only committed ids survive)."""
    path = str(tmp_path_factory.mktemp("rocks") / "dedup-0")
    store = RocksDedup.open(path, "t[0] f", H)
    model = MemoryDedup(H)
    committed = copy.deepcopy(model)
    wm = T0  # the engine's contract: the watermark only grows, accepted events are not below it
    try:
        for step in steps:
            kind = step[0]
            if kind == "add":
                ids = [f"e{i}" for i in step[1]]
                # as the engine does: only ids not remembered, each once per call
                fresh = [i for i, hit in zip(dict.fromkeys(ids), model.seen(list(dict.fromkeys(ids)))) if not hit]
                ts = [wm + step[2]] * len(fresh)
                assert store.seen(fresh) == [False] * len(fresh)
                store.add(fresh, ts)
                model.add(fresh, ts)
            elif kind == "seen":
                ids = [f"e{i}" for i in step[1]]
                assert store.seen(ids) == model.seen(ids)
            elif kind == "expire":
                wm += step[1]
                store.expire(wm)
                model.expire(wm)
            elif kind == "commit":
                store.commit(7)
                committed = copy.deepcopy(model)
                assert store.staged() == 0
            else:
                store.close()
                store = RocksDedup.open(path, "t[0] f", H)
                model = copy.deepcopy(committed)
                wm = max(wm, T0)
            assert len(store) == len(model)
        every = [f"e{i}" for i in range(41)]
        assert store.seen(every) == model.seen(every)
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def test_an_id_accepted_again_in_a_newer_bucket_survives_the_old_one(tmp_path):
    store = RocksDedup.open(str(tmp_path / "d"), "x", H)
    model = MemoryDedup(H)
    for s in (store, model):
        s.add(["a"], [T0])
        s.add(["a"], [T0 + 2 * BUCKET_MS])  # not what the engine does, but the rule still holds
    store.commit(1)
    for s in (store, model):
        s.expire(T0 + BUCKET_MS + H)  # forgets bucket T0 only
    store.commit(2)
    assert store.seen(["a"]) == model.seen(["a"]) == [True]
    store.close()


def test_expiry_deletes_the_rows_on_disk(tmp_path, monkeypatch):
    from kpimon.agents.worker import dedup_store

    monkeypatch.setattr(dedup_store, "EXPIRE_BUDGET", 100)  # several commits per bucket
    monkeypatch.setattr(dedup_store, "MULTI_GET_KEYS", 7)  # and each commit's reads in several multi-gets
    store = RocksDedup.open(str(tmp_path / "d"), "x", H)
    ids = [f"id{i}" for i in range(1000)]
    store.add(ids, [T0] * 1000)
    store.add(["late"], [T0 + 5 * BUCKET_MS])
    store.commit(1)
    assert store.seen([*ids, "never", "late"]) == [True] * 1000 + [False, True]  # 143 multi-gets, in order
    store.expire(T0 + BUCKET_MS + H)
    assert store.seen(ids[:3]) == [False] * 3  # forgotten at once, deleted later
    assert len(store) == 1
    for n in range(2, 20):
        store.commit(n)
    rows = [d for d, _ in store._db.items() if len(d) == 16]
    it = store._journal_iter()
    it.seek_to_first()
    journal = []
    while it.valid():
        journal.append(it.key())
        it.next()
    del it
    assert len(rows) == 1 and len(journal) == 1
    assert store.seen(["late"]) == [True]
    store.close()


def test_staged_ids_are_lost_without_commit_and_kept_with_it(tmp_path):
    path = str(tmp_path / "d")
    store = RocksDedup.open(path, "x", H)
    store.add(["a"], [T0])
    first = store.seal()
    store.add(["b"], [T0])  # a later record, not acknowledged yet
    store.commit(5, upto=first, check=42)
    assert store.staged() == 1 and store.seen(["a", "b"]) == [True, True]
    store.close()
    store = RocksDedup.open(path, "x", H)
    assert (store.position, store.check) == (5, 42)
    assert store.seen(["a", "b"]) == [True, False]
    store.close()


def test_no_per_id_objects_are_kept_after_commit(tmp_path):
    store = RocksDedup.open(str(tmp_path / "d"), "x", H)
    ids = [f"id{i}" for i in range(5000)]
    assert store.seen(ids) == [False] * 5000
    store.add(ids, [T0] * 5000)
    store.commit(1)
    assert store.staged() == 0
    assert not store._gens and not store._cur.ids and not store._absent
    assert len(store._counts) <= 1  # per bucket, not per id
    assert len(store) == 5000
    store.close()


def test_replaying_makes_add_a_noop(tmp_path):
    store = RocksDedup.open(str(tmp_path / "d"), "x", H)
    store.replaying = True
    store.add(["a"], [T0])
    store.replaying = False
    assert store.seen(["a"]) == [False] and store.staged() == 0
    store.close()


def test_a_store_of_something_else_or_beyond_the_log_starts_empty(tmp_path):
    path = str(tmp_path / "d")
    store = RocksDedup.open(path, "log[0] f1", H)
    store.add(["a"], [T0])
    store.commit(10)
    store.close()
    store = RocksDedup.open(path, "log[0] f2", H)  # other settings fingerprint
    assert store.position is None and store.seen(["a"]) == [False] and len(store) == 0
    store.add(["a"], [T0])
    store.commit(10)
    store.close()
    store = RocksDedup.open(path, "log[0] f2", H, log_end=10)
    assert store.position == 10 and store.seen(["a"]) == [True]
    store.close()
    store = RocksDedup.open(path, "log[0] f2", H, log_end=9)  # the log was recreated: shorter
    assert store.position is None and store.seen(["a"]) == [False]
    store.close()
    meta = json.dumps({"identity": "log[0] f2"})
    assert meta  # the meta key is plain JSON (documented in the module)


def test_a_store_held_by_someone_else_falls_back_to_a_private_one(tmp_path):
    first = open_partition_store(str(tmp_path), "app", 0, "x", H)
    second = open_partition_store(str(tmp_path), "app", 0, "x", H)
    assert second.path != first.path and getattr(second, "remove_on_close", False)
    from kpimon.agents.worker.dedup_store import close_store

    close_store(second)
    close_store(first)
    assert not (tmp_path / "app" / "dedup-0").with_name(second.path.rsplit("/", 1)[-1]).exists()


# ----------------------------------------------------------------------------- recovery with the store
def _log(settings, n: int = 40):
    """State-log records of one partition: n events (ids x0..), in batches of 7."""
    from kpimon.agents.core.engine import PartitionEngine

    msgs = [FakeRecord("events", 0, i, b"u", json.dumps(
        {"event_id": f"x{i}", "user_id": f"u{i % 5}", "type": "login", "ts": T0 + i * 1000}).encode())
        for i in range(n)]
    records, _ = process_all(PartitionEngine(EngineConfig.from_settings(settings)), settings, msgs, 0)
    return records


def _reader(records: list[Record]):
    async def read(partitions):
        for offset, record in enumerate(records):
            yield 0, offset, record
    return read


def _recover(settings, records, path):
    cfg = EngineConfig.from_settings(settings)
    opened = {}

    def stores(p):
        opened[p] = RocksDedup.open(path, f"log[{p}] {cfg.fingerprint}", cfg.dedup_horizon)
        return opened[p]

    out = asyncio.run(recovery.replay_partitions(cfg, _reader(records), [0], stores=stores))
    return out[0], opened[0]


@pytest.mark.parametrize("damage", ["none", "deleted", "partial"])
def test_recovery_rebuilds_the_store_from_the_state_log(tmp_path, damage):
    settings = settings_factory()
    records = _log(settings)
    path = str(tmp_path / "dedup-0")
    rec, store = _recover(settings, records, path)
    assert store.position == len(records) and store.staged() == 0
    assert store.seen([f"x{i}" for i in range(40)]) == [True] * 40
    store.close()
    if damage == "deleted":
        shutil.rmtree(path)  # torn state: the directory is gone
    elif damage == "partial":
        # a store that committed only the first records: the rest must be re-added on recovery
        shutil.rmtree(path)
        _, store = _recover(settings, records[:2], path)
        store.close()
    rec, store = _recover(settings, records, path)
    assert store.position == len(records)
    assert store.seen([f"x{i}" for i in range(40)] + ["new"]) == [True] * 40 + [False]
    assert rec.engine.totals.accepted == 40
    store.close()


def test_recovery_wipes_a_store_written_for_another_incarnation_of_the_log(tmp_path):
    settings = settings_factory()
    records = _log(settings)
    path = str(tmp_path / "dedup-0")
    _, store = _recover(settings, records, path)
    store.close()
    # The state log was recreated: the same length, other events (other source offsets).
    other = _log(settings, 60)[:len(records)]
    assert other[-1].end != records[-1].end or other != records
    _, store = _recover(settings, other, path)
    ids = {ev.event_id for r in other for ev in r.events}
    assert store.seen(sorted(ids)) == [True] * len(ids)
    store.close()
    # beyond the log's end: wiped and rebuilt from what the log has
    _, store = _recover(settings, records[:1], path)
    assert store.position == 1
    assert store.seen([f"x{i}" for i in range(39, 40)]) == [False]
    store.close()


def test_a_store_of_another_format_starts_empty(tmp_path):
    from kpimon.agents.worker import dedup_store

    path = str(tmp_path / "d")
    store = RocksDedup.open(path, "x", H)
    store.add(["a"], [T0])
    store.commit(3)
    meta = json.loads(store._db.get(dedup_store.META))
    store._db.put(dedup_store.META, json.dumps({**meta, "format": 1}).encode())  # as an older version wrote it
    store.close()
    store = RocksDedup.open(path, "x", H)
    assert store.position is None and store.seen(["a"]) == [False] and len(store) == 0
    store.close()


def test_journal_entries_of_several_buckets_expire_exactly(tmp_path, monkeypatch):
    """Ids of several buckets in one commit, journal entries of a few ids, a small expiry budget, an id moved to
    a newer bucket: the answers of MemoryDedup, and nothing left on disk once every bucket is gone."""
    from kpimon.agents.worker import dedup_store

    monkeypatch.setattr(dedup_store, "JOURNAL_CHUNK", 7)
    monkeypatch.setattr(dedup_store, "EXPIRE_BUDGET", 10)
    store = RocksDedup.open(str(tmp_path / "d"), "x", H)
    model = MemoryDedup(H)
    ids = [f"id{i}" for i in range(60)]
    ts = [T0 + (i % 3) * BUCKET_MS for i in range(60)]
    assert store.seen(ids) == [False] * 60
    for s in (store, model):
        s.add(ids, ts)
    store.commit(1)
    for s in (store, model):
        s.add(["id0"], [T0 + 4 * BUCKET_MS])  # moved to a newer bucket
    store.commit(2)
    assert len(store) == len(model) == 60
    for step, wm in enumerate((T0 + BUCKET_MS + H, T0 + 2 * BUCKET_MS + H, T0 + 3 * BUCKET_MS + H)):
        for s in (store, model):
            s.expire(wm)
        for n in range(10):
            store.commit(3 + 10 * step + n)
        assert store.seen(ids) == model.seen(ids) and len(store) == len(model)
    rows = [d for d, _ in store._db.items() if len(d) == 16]
    assert len(rows) == 1 and store.seen(["id0"]) == [True]  # only the moved id
    for s in (store, model):
        s.expire(T0 + 5 * BUCKET_MS + H)
    for n in range(5):
        store.commit(100 + n)
    it = store._journal_iter()
    it.seek_to_first()
    assert not it.valid()
    del it
    assert not [d for d, _ in store._db.items() if len(d) == 16] and len(store) == 0
    store.close()


def test_a_commit_survives_the_process_being_killed(tmp_path):
    """The worker is SIGKILLed after a commit, without closing its store: the next open finds the commit."""
    import os
    import signal
    import subprocess
    import sys

    path = str(tmp_path / "d")
    child = (
        "import os, signal, sys\n"
        "from kpimon.agents.worker.dedup_store import RocksDedup\n"
        f"store = RocksDedup.open({path!r}, 'x', {H})\n"
        f"store.add([f'id-{{i}}' for i in range(5000)], [{T0}] * 5000)\n"
        "store.commit(7, check=99)\n"
        f"store.add(['staged'], [{T0}])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert os.path.isdir(path)
    store = RocksDedup.open(path, "x", H)
    assert (store.position, store.check) == (7, 99)
    assert store.seen([f"id-{i}" for i in range(5000)]) == [True] * 5000
    assert store.seen(["staged"]) == [False]
    store.close()


def test_a_commit_that_does_not_tidy_leaves_expired_rows_to_the_next(tmp_path):
    """Recovery's last commit (tidy=False) deletes nothing; the worker's next commit deletes the expired rows."""
    store = RocksDedup.open(str(tmp_path / "d"), "x", H)
    store.add([f"old-{i}" for i in range(100)], [T0] * 100)
    store.commit(1)
    store.expire(T0 + BUCKET_MS + H)
    store.commit(2, tidy=False)
    assert store.seen(["old-0"]) == [False]  # forgotten at once
    assert sum(len(d) == 16 for d, _ in store._db.items()) == 100
    store.commit(3)
    assert sum(len(d) == 16 for d, _ in store._db.items()) == 0
    store.close()
