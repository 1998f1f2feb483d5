"""The serving layer: per-user state and at-risk lists in Redis, exactly once, never blocking the stream.

What is in Redis (``<p>`` is ``redis.key_prefix``, ``kpimon:`` by default):

* ``<p>user:<user_id>`` hash: ``state`` (lifecycle state name), ``last_activity``
  (epoch ms), ``signup_ts`` (epoch ms of the first signup) and ``channel`` (its
  raw channel) when the user signed up, ``lifetime_revenue_minor`` (purchases
  minus refunds, integer minor units) and ``lifetime_revenue`` (the same as an
  exact decimal string, ``money.decimals`` digits).
* ``<p>at-risk:<state>`` sorted set, one per lifecycle state (``active`` too):
  member user_id, score last activity.  Each user is in exactly one of them.
* ``<p>serving:positions:<state-log topic>`` hash: partition -> the
  **state-log position** the serving layer reflects for that partition: the
  state-log offset after the last record it reflects.
* ``<p>serving:positions-inprogress:<state-log topic>`` hash: partition -> the
  ``end`` of a multi-chunk write under way (see below).

The state is the engine's as of its watermark: events are applied when the
watermark passes them (agents/core/engine.py), and lifecycle states age with it.

**Positions are state-log offsets, not source offsets.**  In live mode the
clock-only record of an idle partition (every ``tick_interval``) covers no
source offsets (``start == end``), yet it can change users: the events the
wall clock made final are applied then, and users age into other states.
Every record has its own offset in its state-log partition, so the position
orders all of them strictly, ticks included: a record the layer reflects is a
repeat, a tick after it is not.

**Writes.**  :meth:`ServingWriter.submit` is called once per state-log record,
after the record is acknowledged by the broker, with the users the record
changed (``PartitionEngine.take_touched``) and the range of positions from the
partition's previous record to the record's own offset + 1 (records another
writer put in between, a producer retry or a former owner's last write, fall
inside the range; replay skips them, so they change nothing).  An update
without users only moves the position: it is merged into the next one, or
written with the next probe.  It only queues: a background task
writes the queue, one pipeline per round (one round trip for every queued
partition), one ``EVALSHA`` of ``APPLY_LUA`` (agents/serving/lua.py) per partition and per chunk of
:data:`CHUNK_USERS` users.  The script compares the partition's stored
position with the update's ``[start, end)``: ``stored >= end`` means already
applied (a repeat: nothing happens; ``result="repeat"`` counts only these: an
update sent again after a round trip with unknown outcome, or a former owner's
update that a newer one overtook); ``stored < start`` (or nothing stored) is a
gap (Redis lost data: the partition is rebuilt from the state log, see below);
otherwise it writes every user and sets the position to ``end`` in the same
atomic script.

**Every value written is absolute**, lifetime revenue included (the engine
keeps each paying user's running total, so checkpoints carry it and recovery
restores it).  So applying an update twice, applying it over a newer one's
prefix, or merging updates is harmless; an update ``[start, end)`` holds every
user changed in that range with their values as of ``end``, and applying it to
a state as of any position in ``[start, end)`` gives the state as of ``end``.
That is what makes the following exactly-once without cross-system
transactions:

* *Chunks.*  A big update is split into several script calls; only the last
  sets the position.  A crash between chunks leaves some users written ahead of
  the position: re-applying the whole update rewrites them with the same values.
  The earlier chunks mark ``inprogress[p] = end`` so that an older update from
  another writer (a former owner during a rebalance) cannot overwrite the newer
  values in between; any newer writer has ``end >= inprogress`` (it replayed
  the records the chunked writer had already acknowledged).
* *Outages.*  While Redis is down the queue keeps one merged update per
  partition (per user the latest values; the range from the first pending
  ``start`` to the latest ``end``), so the backlog is bounded by the users
  touched since the outage began.  A round trip whose outcome is unknown (the
  connection dropped mid-pipeline) is put back and merged too: re-applying it
  is harmless.
* *Crashes.*  A worker that dies with a backlog loses nothing: the next owner
  of the partition (``ServingRecovery`` in agents/worker/recovery.py) reads
  the stored position, replays the state log with change tracking switched on
  for the records at or past it (tick records included), and submits those
  users as one update starting at that position.  Revenue is rebuilt from the
  replay, so a redelivery never counts a purchase twice.
* *Data loss in Redis* (a restart without persistence, a flush, a failover to
  a stale replica) shows up as a gap on the next write, or as a missing or
  smaller position on the periodic probe.  The writer then rebuilds the
  partition's full user state from the state log in the background (a fresh
  engine, yielding to the event loop between records) and writes it as a
  ``RESET`` update before the updates held meanwhile.

Limits: a worker that recovers while Redis is unreachable cannot know the
stored position, so it collects and rewrites every user of the partition once
(memory for the tracked users during the replay, one big write when Redis is
back).  A rebuild after data loss replays the partition's whole state log in
the worker.  Keys are
built inside the scripts, so Redis Cluster is not supported.  Keys of users who
disappear from the state log (a new deployment with the same topic names but
old Redis data) are not removed: a new deployment needs a new ``key_prefix``.
Versions before state-log positions kept source offsets under
``serving:offsets:`` and ``serving:inprogress:``: an upgraded worker finds no
position, rewrites every user of its partitions once, and leaves those two
keys alone (they can be deleted).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgspec

from kpimon.agents.core.engine import WINDOWS
from kpimon.agents.core.lifecycle import STATES, Ladder, Thresholds
from kpimon.agents.serving import redis_client
from kpimon.agents.serving.lua import APPLY_LUA, APPLY_SHA, RESET
from kpimon.agents.serving.updates import LogSource, Update, Users
from kpimon.backoff import Backoff
from kpimon.streams.events import format_money
from kpimon.streams.topics import Topics

log = logging.getLogger("kpimon.serving")
_msgpack = msgspec.msgpack.Encoder()

CHUNK_USERS = 5000  # users per script call; a call runs atomically in Redis, so this bounds its pause
CALLS_PER_TRIP = 8  # script calls per pipeline: a large backlog is written in several round trips

def connect(url: str, timeout: float = redis_client.TIMEOUT_S) -> Any:
    """A ``redis.asyncio.Redis`` that fails fast: no client-side retries (the writer has its own)."""
    return redis_client.client(url, asyncio=True, timeout=timeout)


def redis_errors() -> tuple[type[BaseException], ...]:
    return redis_client.errors()


class ServingWriter:
    """Queues per-partition updates and writes them to Redis in the background (see the module doc)."""

    def __init__(self, settings: Any, registry: Any = None, *, client: Any = None, chunk_users: int = CHUNK_USERS,
                 probe_interval: float = 5.0, retry_max: float = 2.0,
                 rebuild: Callable[[int], Awaitable[Update]] | None = None) -> None:
        self.settings = settings
        self.prefix = settings.redis.key_prefix
        topic = Topics(settings.kafka.topic_prefix, settings.worker.app_id).state_log
        # State-log positions (see the module doc); new key names, so that an upgraded worker rewrites once.
        self.offsets_key = f"{self.prefix}serving:positions:{topic}"
        self.progress_key = f"{self.prefix}serving:positions-inprogress:{topic}"
        self.zone_state = Ladder.build(Thresholds(*settings.lifecycle.thresholds), WINDOWS).state
        self.decimals = settings.money.decimals
        self.chunk_users = chunk_users
        self.probe_interval = probe_interval
        self.retry_max = retry_max
        self._client = client
        self._rebuild = rebuild
        self.source: LogSource | None = None  # the worker's state log and ownership, for rebuilds
        self.queues: dict[int, list[Update]] = {}
        self.gen: dict[int, int] = {}  # bumped when a partition is (re)assigned: stale work is dropped
        self.applied: dict[int, int] = {}  # the position this writer last saw stored, per partition
        self.resyncing: set[int] = set()
        self.up = False
        self._seen_up = False
        self._down_since: float | None = None
        self._written_since_down = 0
        self._inflight_users = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._stopping = False
        self._resync_tasks: set[asyncio.Task] = set()
        self._register_metrics(registry)

    # ----------------------------------------------------------------- metrics
    def _register_metrics(self, registry: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        registry = registry if registry is not None else CollectorRegistry()
        self.m_up = Gauge("kpimon_serving_up", "1 while the serving layer (Redis) accepts writes, else 0",
                          registry=registry)
        backlog = Gauge("kpimon_serving_backlog_users", "Users changed but not yet written to the serving layer",
                        registry=registry)
        backlog.set_function(self.backlog_users)
        writes = Counter("kpimon_serving_writes", "Serving-layer updates by outcome (applied, repeat: already "
                         "applied, gap: Redis lost data, error: round trip failed)", ["result"], registry=registry)
        self.m_writes = {r: writes.labels(r) for r in ("applied", "repeat", "gap", "error")}
        self.m_resyncs = Counter("kpimon_serving_rebuilds", "Partitions rebuilt from the state log into the "
                                 "serving layer after Redis lost data", registry=registry)
        self.m_seconds = Histogram("kpimon_serving_write_seconds", "Duration of one serving-layer round trip",
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                   registry=registry)

    def backlog_users(self) -> int:
        return self._inflight_users + sum(len(u.users) for q in self.queues.values() for u in q)

    # ------------------------------------------------------------------ client
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect(self.settings.redis.url)
        return self._client

    def attach(self, source: LogSource) -> None:
        """Attach the worker (:class:`LogSource`): rebuilds read its state log."""
        self.source = source

    def start(self) -> None:
        """Start the background writer (idempotent; needs a running event loop)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kpimon-serving-writer")

    # ------------------------------------------------------------------ submit
    def _users(self, touched: dict[str, list]) -> Users:
        """The engine's ``take_touched`` records as serving values (all absolute, revenue included)."""
        zs = self.zone_state
        return {uid: (zs[zone], last, signup, channel, revenue)
                for uid, (last, zone, signup, channel, revenue) in touched.items()}

    def submit(self, partition: int, start: int, end: int, touched: dict[str, list]) -> None:
        """Queue what one acknowledged state-log record changed; never blocks (engine ``take_touched`` format)."""
        self._enqueue(partition, Update(start, end, self._users(touched)))

    def _enqueue(self, p: int, upd: Update, front: bool = False, wake: bool = False) -> None:
        q = self.queues.setdefault(p, [])
        if front:
            q.insert(0, upd)
        elif q and q[-1].end == upd.start:
            q[-1].absorb(upd)
        else:
            q.append(upd)
        # An update without users only moves the position: it waits for the next one or the next probe.
        if upd.users or front or wake:
            if self._task is None:
                self.start()
            self._wake.set()

    def recovered(self, partition: int, start: int, end: int, touched: dict[str, list]) -> None:
        """A partition was (re)assigned: forget older work, queue what the stored position misses."""
        self.gen[partition] = self.gen.get(partition, 0) + 1
        self.queues.pop(partition, None)
        self.resyncing.discard(partition)
        self.applied.pop(partition, None)
        users = self._users(touched)
        if start >= 0:
            self.applied[partition] = start  # read from Redis just now: the probe watches it from here
            if start == end and not users:
                return  # Redis is up to date: nothing to write (it would only count as a repeat)
        # A snapshot (RESET, FORCE) is written at once, so that Redis holds the partition's position early.
        self._enqueue(partition, Update(start, end, users), wake=start < 0)

    def retain(self, partitions: Iterable[int]) -> None:
        """Drop the state of partitions this worker no longer owns (their next owner recovers them)."""
        keep = set(partitions)
        for p in set(self.queues) | set(self.applied):
            if p not in keep:
                self._forget(p)

    def _forget(self, p: int) -> None:
        self.queues.pop(p, None)
        self.applied.pop(p, None)
        self.resyncing.discard(p)
        self.gen[p] = self.gen.get(p, 0) + 1

    async def read_offsets(self, partitions: list[int], timeout: float = 3.0) -> dict[int, int | None] | None:
        """The stored position of each partition, or None if Redis cannot be reached."""
        if not partitions:
            return {}
        try:
            raw = await asyncio.wait_for(self.client.hmget(self.offsets_key, [str(p) for p in partitions]), timeout)
        except redis_errors() as err:
            self._set_down(err)
            return None
        self._set_up()
        return {p: None if v is None else int(v) for p, v in zip(partitions, raw)}

    # ------------------------------------------------------------------- write
    def _take(self) -> list[tuple[int, int, Update]]:
        items: list[tuple[int, int, Update]] = []
        for p in list(self.queues):
            if p in self.resyncing:
                continue
            q = self.queues.pop(p)
            merged: list[Update] = []
            for u in q:
                if merged and merged[-1].end == u.start:
                    merged[-1].absorb(u)
                else:
                    merged.append(u)
            gen = self.gen.get(p, 0)
            items.extend((p, gen, u) for u in merged)
        return items

    def _put_back(self, items: list[tuple[int, int, Update]]) -> None:
        by_p: dict[int, list[Update]] = {}
        for p, gen, u in items:
            if self.gen.get(p, 0) == gen:
                by_p.setdefault(p, []).append(u)
        for p, us in by_p.items():
            self.queues[p] = us + self.queues.get(p, [])

    def _calls(self, p: int, u: Update) -> list[list]:
        dec = self.decimals
        states = STATES
        encode = _msgpack.encode
        items = list(u.users.items())
        size = self.chunk_users
        calls = []
        for i in range(0, max(1, len(items)), size):
            rows = [(uid, states[st], last, "" if signup is None else signup, channel or "", rev,
                     format_money(rev, dec)) for uid, (st, last, signup, channel, rev) in items[i:i + size]]
            calls.append([self.prefix, p, u.start, u.end, 1 if i + size >= len(items) else 0, encode(rows)])
        return calls

    async def _apply(self, items: list[tuple[int, int, Update]]) -> list[tuple[str, int]]:
        """One round trip for every item: (outcome, stored position or users written) per item."""
        from redis.exceptions import NoScriptError

        client = self.client
        plan: list[int] = []  # number of calls per item
        calls: list[list] = []
        for p, _, u in items:
            cs = self._calls(p, u)
            plan.append(len(cs))
            calls.extend(cs)
        res: list = []
        # Usually one round trip; a backlog goes in several, so that Redis serves readers in between.
        for first in range(0, len(calls), CALLS_PER_TRIP):
            for attempt in range(2):
                pipe = client.pipeline(transaction=False)
                for args in calls[first:first + CALLS_PER_TRIP]:
                    pipe.evalsha(APPLY_SHA, 2, self.offsets_key, self.progress_key, *args)
                started = time.perf_counter()
                part = await pipe.execute(raise_on_error=False)
                self.m_seconds.observe(time.perf_counter() - started)
                if attempt == 0 and any(isinstance(r, NoScriptError) for r in part):
                    await client.script_load(APPLY_LUA)  # once per Redis start: the script cache is not persisted
                    continue
                break
            for r in part:
                if isinstance(r, Exception):
                    raise r
            res.extend(part)
        out = []
        i = 0
        for n in plan:
            rs = res[i:i + n]
            i += n
            if any(int(r[0]) == -1 for r in rs):
                out.append(("gap", int(next(r for r in rs if int(r[0]) == -1)[1])))
            elif int(rs[-1][0]) == 1:
                out.append(("applied", sum(int(r[1]) for r in rs)))
            else:
                out.append(("repeat", int(rs[-1][1])))
        return out

    async def flush(self) -> bool:
        """Write everything queued now, in one round trip; False if Redis could not be reached."""
        async with self._send_lock:
            items = self._take()
            if not items:
                return True
            self._inflight_users = sum(len(u.users) for _, _, u in items)
            try:
                if not self.up:
                    await self.client.ping()  # cheap: do not encode a large backlog for a Redis still down
                results = await self._apply(items)
            except Exception as err:
                self._inflight_users = 0
                self._put_back(items)
                self.m_writes["error"].inc()
                if not isinstance(err, redis_errors()):
                    log.exception("serving layer write failed")
                self._set_down(err)
                return False
            self._inflight_users = 0
            self._set_up(quiet=True)
            gaps = []
            for (p, gen, u), (outcome, info) in zip(items, results):
                self.m_writes[outcome].inc()
                if self.gen.get(p, 0) != gen:
                    continue
                if outcome == "applied":
                    self.applied[p] = u.end
                    self._written_since_down += info
                elif outcome == "repeat":
                    self.applied[p] = max(info, self.applied.get(p, info))
                else:
                    gaps.append((p, gen, u, info))
            self._put_back([g[:3] for g in gaps])  # held (in order) until the partition is rebuilt
            for p, _, u, info in gaps:
                self._lost(p, f"stored position {'none' if info < 0 else info}, update [{u.start}, {u.end})")
            self._caught_up()
            return True

    def _caught_up(self) -> None:
        if self._down_since is not None and not self.backlog_users() and not self.resyncing:
            log.warning("serving layer caught up after %.1fs: %d users written",
                        time.monotonic() - self._down_since, self._written_since_down)
            self._down_since = None

    def _set_down(self, err: BaseException) -> None:
        self.m_up.set(0)
        if self.up or not self._seen_up:
            self._seen_up = True
            log.warning("serving layer unavailable (%s: %s): the stream keeps being processed; %d users queued, "
                        "retrying", type(err).__name__, err, self.backlog_users())
        if self.up or self._down_since is None:
            self._down_since = time.monotonic()
            self._written_since_down = 0
        self.up = False

    def _set_up(self, quiet: bool = False) -> None:
        self.m_up.set(1)
        if not self.up and self._seen_up and not quiet:
            log.warning("serving layer reachable again: %d users queued", self.backlog_users())
        self._seen_up = True
        self.up = True

    async def _run(self) -> None:
        backoff = Backoff(0.05, cap=self.retry_max)
        await self._probe()
        while True:
            if not any(self.queues.get(p) for p in self.queues if p not in self.resyncing):
                if self._stopping:
                    return
                try:
                    await asyncio.wait_for(self._wake.wait(), self.probe_interval)
                except TimeoutError:
                    await self._probe()
                self._wake.clear()
                continue
            self._wake.clear()
            ok = await self.flush()
            if ok:
                backoff.reset()
            else:
                if self._stopping:
                    return
                await asyncio.sleep(backoff.next())

    async def _probe(self) -> None:
        """Is Redis there, and does it still hold what we wrote?  (Idle workers notice outages and data loss.)"""
        parts = sorted(self.applied)
        try:
            if parts:
                raw = await self.client.hmget(self.offsets_key, [str(p) for p in parts])
            else:
                await self.client.ping()
                raw = []
        except redis_errors() as err:
            self._set_down(err)
            return
        self._set_up()
        self._caught_up()
        for p, v in zip(parts, raw):
            if p in self.resyncing or p not in self.applied:
                continue
            if v is None or int(v) < self.applied[p]:
                self._lost(p, f"stored position {'none' if v is None else int(v)}, written {self.applied[p]}")

    # ----------------------------------------------------------------- rebuild
    def _lost(self, p: int, detail: str) -> None:
        if p in self.resyncing:
            return
        log.error("serving layer is missing data of partition %d (%s): rebuilding it from the state log", p, detail)
        self.resyncing.add(p)
        self.applied.pop(p, None)
        self.m_resyncs.inc()
        task = asyncio.get_running_loop().create_task(self._resync(p, self.gen.get(p, 0)))
        self._resync_tasks.add(task)
        task.add_done_callback(self._resync_tasks.discard)

    async def _resync(self, p: int, gen: int) -> None:
        delay = Backoff(0.5, cap=10.0)
        while self.gen.get(p, 0) == gen and not self._stopping:
            if self._rebuild is None and (self.source is None or not self.source.owns(p)):
                log.warning("partition %d is no longer owned here: its serving data is left to its owner", p)
                self._forget(p)
                return
            try:
                snapshot = await (self._rebuild(p) if self._rebuild is not None else self._replay(p))
            except Exception:
                log.exception("rebuilding partition %d of the serving layer failed; retrying", p)
                await asyncio.sleep(delay.next())
                continue
            if self.gen.get(p, 0) != gen:
                return
            self.resyncing.discard(p)
            log.warning("partition %d rebuilt from the state log: %d users up to position %d", p,
                        len(snapshot.users), snapshot.end)
            self._enqueue(p, snapshot, front=True)
            return

    async def _replay(self, p: int) -> Update:
        assert self.source is not None, "the writer needs attach() before it can rebuild from the state log"
        touched, end = await self.source.replay_users(p)
        return Update(RESET, end, self._users(touched))

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``), then stop.  A backlog left is rewritten by the next owner."""
        if self._task is None:
            await self._close()
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except (TimeoutError, Exception):  # noqa: BLE001 - best effort: what is left is logged below, the next owner rewrites it
            pass
        for task in [self._task, *self._resync_tasks]:
            task.cancel()
        await asyncio.gather(self._task, *self._resync_tasks, return_exceptions=True)
        left = self.backlog_users()
        if left:
            log.warning("stopping with %d users not written to the serving layer; the partitions' next owner "
                        "rewrites them from the state log", left)
        self._task = None
        await self._close()

    async def _close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception:  # noqa: BLE001 - closing a connection that may be broken already: nothing to do
                pass
            self._client = None


__all__ = [
    "CHUNK_USERS",
    "ServingWriter",
    "connect",
]
