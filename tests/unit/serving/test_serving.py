"""The serving layer (agents/serving/writer.py, agents/http/api.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
import uuid

import orjson
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from kpimon.agents.core.batch import Record
from kpimon.agents.core.batch import decode as decode_record
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.core.lifecycle import STATES
from kpimon.agents.core.periods import Calendar
from kpimon.agents.http.api import ServingApi
from kpimon.agents.serving import lua, read
from kpimon.agents.serving import writer as serving
from kpimon.agents.serving.lua import RESET
from kpimon.agents.serving.updates import Update
from kpimon.agents.serving.writer import ServingWriter
from kpimon.agents.tools.datasets import generate
from kpimon.agents.worker.recovery import Replayer, ServingRecovery
from kpimon.config.settings import ConfigError, from_mapping
from kpimon.streams.events import Decoder, Rejected
from kpimon.streams.topics import Topics
from tests.launchers import RedisServer
from tests.serving_reference import expected_users
from tests.serving_support import START, make_settings, zone_of

DAY = 86_400_000
@pytest_asyncio.fixture(loop_scope="function")
async def client(redis_server):
    c = serving.connect(redis_server.url)
    yield c
    await c.aclose()


@pytest.fixture
def registry():
    return CollectorRegistry()


async def user(client, settings, uid: str) -> dict | None:
    return await read.get_user(client, settings.redis.key_prefix, uid)


async def members(client, settings, state: str) -> list[str]:
    raw = await client.zrange(f"{settings.redis.key_prefix}at-risk:{state}", 0, -1)
    return [m.decode() for m in raw]


async def test_applying_the_same_batch_twice_changes_nothing_and_counts_revenue_once(redis_server, client,
                                                                                       registry):
    s = make_settings(redis_server.url)
    w = ServingWriter(s, registry)
    active = zone_of(s, "active")
    w.recovered(0, RESET, 0, {})
    w.submit(0, 0, 10, {"u1": [START, active, START - 5, "organic", 0], "u2": [START + 1, active, None, None, 1999]})
    assert await w.flush()
    first = await user(client, s, "u2")
    assert first == {"user_id": "u2", "state": "active", "last_activity": START + 1, "signup_ts": None,
                     "channel": None, "lifetime_revenue": "19.99", "lifetime_revenue_minor": 1999}
    assert (await user(client, s, "u1"))["signup_ts"] == START - 5
    assert (await user(client, s, "u1"))["channel"] == "organic"

    # Redelivery: another writer (a restarted worker) sends the same record again, lifetime revenue included.
    again = ServingWriter(s, CollectorRegistry())
    again.submit(0, 0, 10, {"u2": [START + 1, active, None, None, 1999]})
    assert await again.flush()
    assert await user(client, s, "u2") == first
    assert again.applied[0] == 10
    # The same Update applied directly, twice: the second is a repeat.
    upd = Update(0, 10, {"u2": (0, START + 1, None, None, 1999)})
    assert await w._apply([(0, 0, upd)]) == [("repeat", 10)]
    # An update overlapping what is stored (start < stored < end) carries absolute values: applied as is.
    overlap = Update(5, 20, {"u2": (0, START + 2, None, None, 2999)})
    assert await w._apply([(0, 0, overlap)]) == [("applied", 1)]
    assert (await user(client, s, "u2"))["lifetime_revenue"] == "29.99"
    assert registry.get_sample_value("kpimon_serving_writes_total", {"result": "applied"}) == 1  # merged
    await w.stop()
    await again.stop()


async def test_states_move_between_the_at_risk_sets(redis_server, client):
    s = make_settings(redis_server.url)
    w = ServingWriter(s)
    w.recovered(3, RESET, 0, {})
    w.submit(3, 0, 1, {"a": [START, zone_of(s, "active"), None, None, 0],
                       "b": [START + 5, zone_of(s, "active"), None, None, 0]})
    await w.flush()
    assert await members(client, s, "active") == ["a", "b"]
    w.submit(3, 1, 2, {"a": [START, zone_of(s, "sleeping"), None, None, 0]})
    await w.flush()
    assert await members(client, s, "active") == ["b"]
    assert await members(client, s, "sleeping") == ["a"]
    w.submit(3, 2, 3, {"a": [START + 40 * DAY, zone_of(s, "active"), None, None, 0],
                       "b": [START + 5, zone_of(s, "dead"), None, None, 0]})
    await w.flush()
    assert await members(client, s, "active") == ["a"]
    assert await members(client, s, "sleeping") == []
    assert await members(client, s, "dead") == ["b"]
    assert (await user(client, s, "a"))["last_activity"] == START + 40 * DAY
    assert await client.zscore(f"{s.redis.key_prefix}at-risk:active", "a") == START + 40 * DAY
    await w.stop()


async def test_a_backlog_is_merged_while_redis_is_down_and_written_when_it_returns(registry, caplog):
    caplog.set_level(logging.WARNING, "kpimon.serving")
    with RedisServer(extra_args=["--appendonly", "yes"]) as own:  # persistence: the data survives the restart
        s = make_settings(own.url)
        w = ServingWriter(s, registry, retry_max=0.2)
        active, silent = zone_of(s, "active"), zone_of(s, "silent")
        w.recovered(0, RESET, 100, {})
        w.recovered(1, RESET, 0, {})
        w.submit(0, 100, 110, {"u": [START, active, START, "email", 500]})
        await asyncio.sleep(0.3)
        assert registry.get_sample_value("kpimon_serving_up") == 1
        assert registry.get_sample_value("kpimon_serving_backlog_users") == 0

        own.stop_process()
        # The engine's records carry absolute lifetime revenue: 5.00, then a 2.00 refund.
        w.submit(0, 110, 120, {"u": [START + 1, active, None, None, 300], "v": [START + 2, active, None, None, 0]})
        w.submit(0, 120, 130, {"u": [START + 1, silent, None, None, 300], "x": [START + 3, active, START + 3, None, 0]})
        w.submit(1, 0, 5, {"y": [START, active, None, None, 700]})
        await asyncio.sleep(0.5)  # the background writer tried and failed meanwhile
        assert registry.get_sample_value("kpimon_serving_up") == 0
        assert registry.get_sample_value("kpimon_serving_backlog_users") == 4
        q = w.queues[0]
        assert len(q) == 1 and (q[0].start, q[0].end) == (110, 130)  # one merged update: first start, last end
        assert q[0].users["u"] == (STATES.index("silent"), START + 1, None, None, 300)  # revenue is absolute
        assert "serving layer unavailable" in caplog.text

        own.start()
        for _ in range(100):
            if registry.get_sample_value("kpimon_serving_backlog_users") == 0:
                break
            await asyncio.sleep(0.05)
        assert registry.get_sample_value("kpimon_serving_backlog_users") == 0
        assert registry.get_sample_value("kpimon_serving_up") == 1
        c = serving.connect(own.url)
        got = await user(c, s, "u")
        assert (got["state"], got["signup_ts"], got["channel"], got["lifetime_revenue"]) == (
            "silent", START, "email", "3.00")
        assert (await user(c, s, "x"))["signup_ts"] == START + 3
        assert (await user(c, s, "y"))["lifetime_revenue"] == "7.00"
        assert await c.hgetall(w.offsets_key) == {b"0": b"130", b"1": b"5"}
        assert "caught up" in caplog.text
        await c.aclose()
        await w.stop()


async def test_a_submission_never_waits_for_redis():
    s = make_settings("redis://127.0.0.1:9/0")  # nothing listens there
    w = ServingWriter(s, retry_max=0.1)
    w.recovered(0, RESET, 0, {})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for i in range(200):
        w.submit(0, i, i + 1, {f"u{i}": [START + i, 0, None, None, 0]})
    assert loop.time() - t0 < 0.5
    assert w.backlog_users() == 200
    await w.stop(timeout=0.2)


async def test_lost_redis_data_is_rebuilt_from_the_log_before_the_held_updates(redis_server, client, caplog):
    caplog.set_level(logging.WARNING, "kpimon.serving")
    s = make_settings(redis_server.url)
    rebuilt = []

    async def rebuild(p: int) -> Update:
        rebuilt.append(p)
        return Update(RESET, 20, {"old": (1, START, START - DAY, "social", 100),
                                  "u": (0, START + 5, None, None, 0)})

    w = ServingWriter(s, rebuild=rebuild, probe_interval=0.1)
    w.recovered(0, RESET, 0, {})
    w.submit(0, 0, 10, {"old": [START, zone_of(s, "silent"), START - DAY, "social", 100]})
    await w.flush()
    # Redis loses everything (a restart without persistence, a flush).
    keys = await client.keys(f"{s.redis.key_prefix}*")
    await client.delete(*keys)
    w.submit(0, 10, 20, {"u": [START + 5, zone_of(s, "active"), None, None, 0]})
    w.submit(0, 20, 30, {"v": [START + 6, zone_of(s, "active"), None, None, 0]})
    for _ in range(100):
        if w.applied.get(0) == 30:
            break
        await asyncio.sleep(0.05)
    assert rebuilt == [0]
    assert w.applied.get(0) == 30
    assert (await user(client, s, "old"))["channel"] == "social"
    assert (await user(client, s, "u"))["state"] == "active"
    assert (await user(client, s, "v"))["last_activity"] == START + 6
    assert "rebuilding it from the state log" in caplog.text

    # An idle writer notices the loss too (periodic probe).
    await client.delete(w.offsets_key)
    for _ in range(100):
        if len(rebuilt) == 2 and await client.hget(w.offsets_key, "0") is not None:
            break
        await asyncio.sleep(0.05)
    assert rebuilt == [0, 0]
    await w.stop()


async def test_chunks_are_idempotent_and_an_older_update_cannot_overwrite_a_chunked_one(redis_server, client):
    s = make_settings(redis_server.url)
    w = ServingWriter(s, chunk_users=3)
    w.recovered(0, RESET, 10, {})
    await w.flush()
    users = {f"u{i}": (0, START + i, None, None, i) for i in range(10)}
    upd = Update(10, 20, users)
    calls = w._calls(0, upd)
    assert [c[4] for c in calls] == [0, 0, 0, 1]  # only the last call sets the offset
    # A writer dies after the first chunk: its users are ahead of the offset, "in progress" marks the end.
    await client.eval(lua.APPLY_LUA, 2, w.offsets_key, w.progress_key, *calls[0])
    assert await client.hget(w.progress_key, "0") == b"20"
    assert await client.hget(w.offsets_key, "0") == b"10"
    # An older writer's update of the same range prefix must not overwrite the newer values.
    stale = Update(10, 15, {"u0": (3, START - DAY, None, None, 0)})
    assert await w._apply([(0, w.gen[0], stale)]) == [("repeat", 10)]
    assert (await user(client, s, "u0"))["last_activity"] == START
    # The next owner writes the whole update again: same values, the offset moves on.
    assert await w._apply([(0, w.gen[0], upd)]) == [("applied", 10)]
    assert await client.hget(w.offsets_key, "0") == b"20"
    assert await client.hget(w.progress_key, "0") is None
    got = await read.at_risk(client, s.redis.key_prefix, "active", 100)
    assert [u["user_id"] for u in got] == [f"u{i}" for i in range(10)]
    assert [u["lifetime_revenue_minor"] for u in got] == list(range(10))
    await w.stop()


async def test_a_large_backlog_goes_in_bounded_round_trips(redis_server, client, registry):
    s = make_settings(redis_server.url)
    w = ServingWriter(s, registry, chunk_users=2)
    w.recovered(0, RESET, 0, {})
    w.submit(0, 0, 7, {f"u{i}": [START + i, 0, None, None, 0] for i in range(40)})  # 20 calls
    assert await w.flush()
    trips = registry.get_sample_value("kpimon_serving_write_seconds_count")
    assert trips == -(-20 // serving.CALLS_PER_TRIP) == 3
    assert await client.hget(w.offsets_key, "0") == b"7"
    assert len(await read.at_risk(client, s.redis.key_prefix, "active", 100)) == 40
    await w.stop()


async def test_readers_order_oldest_first_and_export_csv_and_json(redis_server, client):
    s = make_settings(redis_server.url, timezone="Europe/Berlin")
    w = ServingWriter(s)
    sleeping = zone_of(s, "sleeping")
    w.recovered(0, RESET, 0, {})
    w.submit(0, 0, 1, {"c": [START + 3000, sleeping, None, None, 0],
                       "a": [START + 1000, sleeping, START, "email", 12345],
                       "b": [START + 1000, sleeping, None, None, -50],
                       "z": [START, zone_of(s, "active"), None, None, 0]})
    await w.flush()
    prefix = s.redis.key_prefix
    assert [u["user_id"] for u in await read.at_risk(client, prefix, "sleeping", 10)] == ["a", "b", "c"]
    assert [u["user_id"] for u in await read.at_risk(client, prefix, "sleeping", 2, 1)] == ["b", "c"]
    assert [u["user_id"] async for u in read.iter_at_risk(client, prefix, "sleeping", page=1)] == ["a", "b", "c"]
    assert [u["user_id"] async for u in read.iter_at_risk(client, prefix, "sleeping", limit=2, page=1)] == [
        "a", "b"]
    assert await read.at_risk(client, prefix, "dead", 10) == []
    assert await read.get_user(client, prefix, "nobody") is None
    with pytest.raises(ValueError):
        await read.at_risk(client, prefix, "asleep", 10)
    with pytest.raises(ValueError):
        await read.at_risk(client, prefix, "sleeping", read.MAX_PAGE + 1)

    cal = Calendar(s.timezone)
    out = io.StringIO()
    assert await read.export_at_risk(client, prefix, "sleeping", "csv", cal, out.write) == 3
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == list(read.CSV_HEADER)
    assert rows[1] == ["a", "sleeping", "2024-01-01T01:00:01+01:00", "2024-01-01T01:00:00+01:00", "email", "123.45"]
    assert rows[2][5] == "-0.50"
    assert [r[0] for r in rows[1:]] == ["a", "b", "c"]
    out = io.StringIO()
    await read.export_at_risk(client, prefix, "sleeping", "json", cal, out.write)
    assert [u["user_id"] for u in orjson.loads(out.getvalue())] == ["a", "b", "c"]
    out = io.StringIO()
    assert await read.export_at_risk(client, prefix, "dead", "json", cal, out.write) == 0
    assert orjson.loads(out.getvalue()) == []
    out = io.StringIO()
    await read.export_at_risk(client, prefix, "dead", "csv", cal, out.write)
    assert out.getvalue() == ",".join(f'"{h}"' for h in read.CSV_HEADER) + "\n"  # every cell quoted
    await w.stop()


def _events(n: int, seed: int, users: int) -> list:
    dec = Decoder()
    out = []
    for line in generate(n, start_ms=START, seed=seed, users=users, duplicate_ratio=0.01):
        try:
            out.append(dec.decode(line))
        except Rejected:
            pass
    return out


def _as_dicts(events: list) -> list[dict]:
    return [{"user_id": e.user_id, "type": e.type, "ts": e.ts, "event_id": e.event_id, "amount": e.amount,
             "channel": e.channel} for e in events]


async def _serving_state(client, settings, uids) -> dict:
    pipe = client.pipeline(transaction=False)
    for uid in uids:
        pipe.hmget(f"{settings.redis.key_prefix}user:{uid}", list(read.FIELDS))
    return {uid: read._user(uid, vals) for uid, vals in zip(uids, await pipe.execute())}


async def test_the_engine_feed_and_a_crash_recovery_give_the_plain_computation(redis_server, client):
    """Live path (take_touched per record) and recovery after a crash with a backlog, checked plainly."""
    s = make_settings(redis_server.url, lifecycle={"silent_after": "2d", "sleeping_after": "5d",
                                                   "churned_after": "10d", "dead_after": "20d"})
    cfg = EngineConfig.from_settings(s)
    events = _events(12_000, seed=5, users=300)
    engine = PartitionEngine(cfg)
    engine.track_users = True
    w = ServingWriter(s, chunk_users=50)
    w.recovered(0, RESET, 0, {})
    records = []
    accepted_all = []
    pos = 0
    for i in range(0, len(events), 700):
        chunk = events[i:i + 700]
        accepted, _ = engine.offer_batch(chunk)
        accepted_all.extend(accepted)
        marker = None if i + 700 < len(events) else events[-1].ts + DAY
        engine.advance(marker=marker)
        rec = Record(pos, pos + len(chunk), None, marker, accepted, {}, 0, 0, cfg.fingerprint)
        records.append(rec)  # at state-log offset len(records) - 1: updates are ranges of state-log positions
        w.submit(0, len(records) - 1, len(records), engine.take_touched())
        pos = rec.end
        if len(records) == 6:
            await w.flush()  # the first six records reach Redis, the rest stays queued: then the worker dies
    crashed_at = w.applied[0]
    assert crashed_at == 6 and w.backlog_users() > 0
    w.queues.clear()
    await w.stop()

    # The next owner replays the state log with tracking from the stored position on.
    w2 = ServingWriter(s, chunk_users=50)
    w2.start()
    rec2 = ServingRecovery(w2, [0], await w2.read_offsets([0]))
    fresh = PartitionEngine(cfg)
    rp = Replayer(fresh, 0)
    for offset, record in enumerate(records):
        rec2.before(0, record, fresh, offset)
        rp.feed(record)
    rec2.finish(0, fresh, len(records))
    assert rp.offset == pos
    assert w2.queues[0][0].start == crashed_at
    assert len(w2.queues[0][0].users) < fresh.user_count()  # only what Redis misses
    assert await w2.flush()
    assert w2.applied[0] == len(records)

    expected = expected_users(_as_dicts(accepted_all), engine.wm, s.lifecycle.thresholds)
    assert len(expected) == engine.user_count() > 150
    assert len({u["state"] for u in expected.values()}) == 5  # aging after the data reached every state
    got = await _serving_state(client, s, sorted(expected))
    wrong = [uid for uid in expected if got[uid] != expected[uid]]
    assert not wrong, (wrong[:3], [got[u] for u in wrong[:3]], [expected[u] for u in wrong[:3]])
    for state in STATES:
        want = sorted((u["last_activity"], uid) for uid, u in expected.items() if u["state"] == state)
        have = await client.zrange(f"{s.redis.key_prefix}at-risk:{state}", 0, -1, withscores=True)
        assert [(int(score), m.decode()) for m, score in have] == want
    await w2.stop()


async def test_recovery_without_redis_collects_every_user(redis_server):
    s = make_settings("redis://127.0.0.1:9/0")
    cfg = EngineConfig.from_settings(s)
    events = _events(2000, seed=6, users=80)
    w = ServingWriter(s, retry_max=0.1)
    w.start()
    known = await w.read_offsets([0])
    assert known is None
    rec = ServingRecovery(w, [0], known)
    engine = PartitionEngine(cfg)
    rp = Replayer(engine, 0)
    record = Record(0, 2000, None, events[-1].ts, events, {}, 0, 0, cfg.fingerprint)
    rec.before(0, record, engine, 0)
    rp.feed(record)
    rec.finish(0, engine, 1)
    (upd,) = w.queues[0]
    assert upd.start == RESET and upd.end == 1
    assert len(upd.users) == engine.user_count()
    assert engine.track_users
    await w.stop(timeout=0.2)


# ----------------------------------------------------------------------------- live mode: idle ticks
class _Sent:
    """An acknowledged send: what aiokafka's future resolves to (only ``offset`` is read)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


class _FakeProducer:
    """Keeps the state log per partition in memory; acknowledges every send at once."""

    def __init__(self, state_log: str) -> None:
        self.state_log = state_log
        self.log: dict[int, list[bytes]] = {}

    async def send(self, topic: str, value: bytes | None = None, partition: int = 0, **_: object) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        offset = -1
        if topic == self.state_log:
            records = self.log.setdefault(partition, [])
            records.append(value)
            offset = len(records) - 1
        fut.set_result(_Sent(offset))
        return fut


class _FakeConsumer:
    def __init__(self) -> None:
        self.sought: dict[int, int] = {}

    async def seek_to_beginning(self, tp) -> None:
        self.sought[tp.partition] = 0

    async def position(self, tp) -> int:
        return self.sought[tp.partition]

    def seek(self, tp, offset: int) -> None:
        self.sought[tp.partition] = offset


class _Clock:
    """Stands in for the ``time`` module inside agents.ingest: the wall clock is set by the test."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.monotonic = time.monotonic

    def time(self) -> float:
        return self.now_ms / 1000


def _live_service(settings, producer: _FakeProducer, registry=None):
    from kpimon.agents.worker.ingest import IngestService

    svc = IngestService(settings, serving=ServingWriter(settings, registry, probe_interval=60))
    svc.producer = producer
    svc.consumer = _FakeConsumer()
    svc.partitions = 1
    svc.tick_s = 0  # a tick on every poll

    async def read_log(partitions):
        for p in partitions:
            for offset, value in enumerate(producer.log.get(p, [])):
                yield p, offset, decode_record(value)

    svc.read_log = read_log
    svc.checkpointer.enabled = False  # the fake producer keeps the state log only
    return svc


async def test_users_applied_on_idle_ticks_reach_redis_and_a_restart_rebuilds_them(redis_server, client,
                                                                                     monkeypatch):
    """Live mode: events wait for the wall clock; clock-only tick records (source start == end) apply them.

    Every tick record that changes users is written (it has its own state-log
    position), the same update sent twice is a repeat, and a worker that dies
    before writing tick changes has them rewritten by the next owner.
    """
    from aiokafka import TopicPartition
    from aiokafka.structs import ConsumerRecord

    from kpimon.agents.worker import ingest

    s = make_settings(redis_server.url, lateness="1m", worker={"clock": "live"},
                      lifecycle={"silent_after": "1h", "sleeping_after": "2h", "churned_after": "3h",
                                 "dead_after": "4h"})
    clock = _Clock(START)
    monkeypatch.setattr(ingest, "time", clock)
    producer = _FakeProducer(Topics(s.kafka.topic_prefix, s.worker.app_id).state_log)
    registry = CollectorRegistry()
    svc = _live_service(s, producer, registry)
    w = svc.serving
    tp = TopicPartition(svc.topics.events, 0)
    lines = []
    for i in range(12):
        uid = f"u{i:02d}"
        lines.append({"event_id": f"{i}-s", "user_id": uid, "type": "signup", "ts": START + i, "channel": "email"})
        lines.append({"event_id": f"{i}-p", "user_id": uid, "type": "purchase", "ts": START + 100 + i,
                      "amount": f"{i + 1}.25"})
    msgs = [ConsumerRecord(tp.topic, 0, off, START, 0, uid.encode(), orjson.dumps(e), None, 0, 0, [])
            for off, e in enumerate(lines) for uid in [e["user_id"]]]
    expected_events = [{**e, "amount": int(e["amount"].replace(".", "")) if "amount" in e else 0} for e in lines]

    async def poll(batch: dict) -> None:
        await svc.process(batch)
        await svc.settle()  # the records are acknowledged: their users are queued
        assert await w.flush()

    async def redis_matches(engine) -> None:
        want = expected_users(expected_events, engine.wm, s.lifecycle.thresholds)
        assert len(want) == 12
        got = await _serving_state(client, s, sorted(want))
        assert got == want
        for state in STATES:
            assert sorted(await members(client, s, state)) == sorted(u for u in want if want[u]["state"] == state)

    await svc.recover([0])  # a fresh partition: nothing in the state log
    assert await w.flush()
    await poll({tp: msgs})  # the events wait in the reorder buffer (ts >= wall clock - lateness)
    engine = svc.engines[0]
    assert engine.user_count() == 0 and engine.pending_count() == 24
    clock.now_ms = START + 2 * 60_000
    await poll({})  # idle: a tick record (source offsets start == end == 24) applies every event
    assert engine.user_count() == 12
    await redis_matches(engine)
    clock.now_ms = START + 90 * 60_000
    await poll({})  # another tick at the same source offset: everyone turns silent
    await redis_matches(engine)
    assert {u for u in await members(client, s, "silent")} == {f"u{i:02d}" for i in range(12)}
    assert all(decode_record(v).start == decode_record(v).end == 24 for v in producer.log[0][2:])
    assert registry.get_sample_value("kpimon_serving_writes_total", {"result": "repeat"}) == 0

    # The same update delivered twice: the second is a repeat and changes nothing.
    stored = int(await client.hget(w.offsets_key, "0"))
    again = Update(stored - 1, stored, {"u00": (0, START, None, None, 0)})
    assert await w._apply([(0, w.gen[0], again)]) == [("repeat", stored)]
    await redis_matches(engine)

    # A tick moves everyone to sleeping, and the worker dies after the record is durable, before Redis has it.
    lost = []
    w.submit = lambda p, start, end, touched: lost.append(len(touched))
    clock.now_ms = START + 150 * 60_000
    await svc.process({})
    await svc.settle()
    assert lost == [12]
    await w.stop()
    assert (await user(client, s, "u00"))["state"] == "silent"

    # The next owner replays the state log, tracking the records past the stored position: it writes them.
    svc2 = _live_service(s, producer)
    await svc2.recover([0])
    assert await svc2.serving.flush()
    await redis_matches(svc2.engines[0])
    assert (await user(client, s, "u00"))["state"] == "sleeping"
    assert (await user(client, s, "u11"))["lifetime_revenue"] == "12.25"  # not counted twice

    # Redis loses everything; a restart rewrites every user from the state log.
    await client.delete(*await client.keys(f"{s.redis.key_prefix}*"))
    await svc2.serving.stop()
    svc3 = _live_service(s, producer)
    await svc3.recover([0])
    assert await svc3.serving.flush()
    await redis_matches(svc3.engines[0])
    await svc3.serving.stop()


# ----------------------------------------------------------------------------- API and settings
async def test_the_token_is_required_and_compared(redis_server, client):
    s = from_mapping({"redis": {"url": redis_server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}:"}}, "<test>",
                     env={"KPIMON_API_TOKEN": "s3cret-token"})
    w = ServingWriter(s)
    w.recovered(0, RESET, 0, {})
    w.submit(0, 0, 1, {"u1": [START, zone_of(s, "sleeping"), START, "email", 990]})
    await w.flush()
    api = ServingApi(s, client)
    assert (await api.user(None, "u1"))[0] == 401
    status, body, _, headers = await api.user("Bearer wrong", "u1")
    assert status == 401 and headers == {"WWW-Authenticate": "Bearer"}
    assert (await api.user("Basic s3cret-token", "u1"))[0] == 401
    status, body, _, _ = await api.user("Bearer s3cret-token", "u1")
    assert status == 200
    assert body["state"] == "sleeping" and body["lifetime_revenue"] == "9.90"
    assert (body["last_activity"], body["last_activity_ms"]) == ("2024-01-01T00:00:00+00:00", START)
    assert (await api.user("Bearer s3cret-token", "nobody"))[0] == 404
    assert (await api.at_risk("Bearer nope", {"state": "sleeping"}))[0] == 401
    status, body, _, _ = await api.at_risk("Bearer s3cret-token", {"state": "sleeping", "limit": "10"})
    assert status == 200 and [u["user_id"] for u in body["users"]] == ["u1"]
    status, text, kind, _ = await api.at_risk("bearer s3cret-token", {"state": "sleeping", "format": "csv"})
    assert (status, kind) == (200, "csv") and text.splitlines()[1].startswith('"u1","sleeping",')
    assert (await api.at_risk("Bearer s3cret-token", {"state": "asleep"}))[0] == 400
    assert (await api.at_risk("Bearer s3cret-token", {"state": "sleeping", "limit": "10001"}))[0] == 400
    assert (await api.at_risk("Bearer s3cret-token", {"state": "sleeping", "limit": "x"}))[0] == 400

    unset = ServingApi(from_mapping({"redis": {"url": redis_server.url}}, "<test>", env={}), client)
    status, body, _, _ = await unset.user("Bearer s3cret-token", "u1")
    assert status == 503 and "KPIMON_API_TOKEN is not set" in body["error"]
    down = ServingApi(from_mapping({"redis": {"url": "redis://127.0.0.1:9/0"}}, "<test>",
                                   env={"KPIMON_API_TOKEN": "t"}))
    assert (await down.user("Bearer t", "u1"))[0] == 503
    await down.client.aclose()
    await w.stop()


def test_the_token_comes_only_from_the_environment_and_is_never_dumped(tmp_path):
    s = from_mapping({}, "<test>", env={"KPIMON_API_TOKEN": "abc"})
    assert s.api.token.get_secret_value() == "abc"
    assert "abc" not in repr(s) and "abc" not in orjson.dumps(s.model_dump(mode="json")).decode()
    assert from_mapping({}, "<test>", env={}).api.token is None
    with pytest.raises(ConfigError, match="f.yaml: api.token: secrets never live in the file"):
        from_mapping({"api": {"token": "x"}}, "f.yaml", env={})
    again = from_mapping(s.model_dump(mode="json"), "<dump>", env={})
    assert again.api.token is None and again.redis.enabled and again.redis.key_prefix == "kpimon:"


async def test_snapshot_versions_are_served_behind_the_token(redis_server, client):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    s = from_mapping({"redis": {"url": redis_server.url, "key_prefix": prefix}}, "<test>",
                     env={"KPIMON_API_TOKEN": "s3cret-token"})
    v1 = {"grain": "month", "period": "2024-02", "version": 1, "metrics": {"orders": 3}}
    v2 = {**v1, "version": 2, "metrics": {"orders": 4}, "delta": {"orders": 1}}
    await client.hset(f"{prefix}snapshot:month:2024-02", mapping={"2": orjson.dumps(v2), "1": orjson.dumps(v1)})
    api = ServingApi(s, client)
    assert (await api.snapshots(None, "month", "2024-02"))[0] == 401
    status, body, _, _ = await api.snapshots("Bearer s3cret-token", "month", "2024-02")
    assert status == 200
    assert [v["version"] for v in body["versions"]] == [1, 2]  # oldest first, every version
    assert (await api.snapshots("Bearer s3cret-token", "month", "2024-03"))[0] == 404
    assert (await api.snapshots("Bearer s3cret-token", "fortnight", "2024-03"))[0] == 400
