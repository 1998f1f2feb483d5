"""Recovery, in one place: rebuilding a partition's state from the state log.

The worker writes one :class:`~kpimon.agents.core.batch.Record` per processed
batch of input partition *p* to partition *p* of the state-log topic, before
any derived output (period partials, progress) leaves the worker.

Recovery replays the records of partition *p* in order (:class:`Replayer`).  A
record is applied only if its ``start`` equals the offset the replay has
reached, so a record written twice (a producer retry, or a worker fenced out
during a rebalance) is applied once.  The engine is deterministic, so replay
rebuilds exactly the state the previous owner had, and the consumer then seeks
the input partition to the record's ``end``: nothing is lost and nothing is
counted twice.

Three callers, one replay:

* :func:`replay_partitions`: the worker's engines of newly assigned partitions
  (``IngestService.recover``), with :class:`ServingRecovery` bringing the
  serving layer in Redis up to the same position;
* :func:`replay_users`: the serving layer's repair of a partition whose data
  Redis lost (``ServingWriter`` through its ``LogSource``);
* the tests' pipeline without Kafka (tests/pure_pipeline.py).

Why not Kafka transactions?  faust's ``exactly_once`` has known bugs
(faust-streaming #323, #517, #606) and the embedded Tansu broker does not
support transactions at all; one self-describing record per batch is atomic on
every Kafka-protocol broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from kpimon.agents.core.batch import Record, apply, decode
from kpimon.agents.core.dedup import DedupStore
from kpimon.agents.core.engine import Closed, EngineConfig, PartitionEngine
from kpimon.agents.serving.lua import FORCE, RESET
from kpimon.agents.serving.writer import ServingWriter
from kpimon.errors import KpimonError

log = logging.getLogger("kpimon.recovery")

LogReader = Callable[[list[int]], AsyncIterator[tuple[int, int, Record]]]


class StateLogError(KpimonError):
    """The state log cannot rebuild this partition's state; the message says why and what to do."""


class Replayer:
    """Applies a partition's records in order, skipping repeats; tracks the offset."""

    def __init__(self, engine: PartitionEngine, partition: int = 0) -> None:
        self.engine = engine
        self.partition = partition
        self.offset: int | None = None  # next source offset to read
        self.applied = 0
        self.skipped = 0

    def feed(self, record: Record) -> bool:
        expected = self.engine.cfg.fingerprint
        if record.config and expected and record.config != expected:
            raise StateLogError(
                f"state log partition {self.partition} was written under different settings (fingerprint "
                f"{record.config}, now {expected}): timezone, lateness, dedup_horizon, lifecycle thresholds, "
                "money.decimals and channels cannot change under existing state. Restore the previous settings, "
                "or start fresh under a new worker.app_id / kafka.topic_prefix and backfill.")
        if self.offset is not None and record.start != self.offset:
            self.skipped += 1
            return False
        apply(self.engine, record)
        self.offset = record.end
        self.applied += 1
        return True


@dataclass
class Recovered:
    """One partition rebuilt from its state log."""

    engine: PartitionEngine
    offset: int | None  # next source offset to read (None: from the beginning)
    log_end: int  # the state-log position reached (the offset after the partition's last record)
    applied: int
    skipped: int
    last_outbox: list[Closed] = field(default_factory=list)  # what the last applied record closed


StoreFactory = Callable[[int], DedupStore]


async def replay_partitions(cfg: EngineConfig, read: LogReader, partitions: list[int],
                            serving: ServingWriter | None = None,
                            stores: StoreFactory | None = None) -> dict[int, Recovered]:
    """Rebuild the engines of ``partitions`` from the state log (and the serving layer's users, if given).

    The last applied record's closed periods are kept in ``last_outbox``: they
    may not have left before the previous owner stopped, and re-publishing them
    is idempotent downstream.

    ``stores(p)`` opens partition ``p``'s dedup store (the worker's on disk,
    agents/worker/dedup_store.py; default: in memory).  A store on disk already
    holds the ids of the records before its ``position``: those records are
    replayed without adding their ids again.  A store that does not match the
    log (its position is beyond the log's end, or the record before its
    position is not the one it committed) is wiped and the partition replayed
    again.  At the end each store commits the state-log position reached.
    """
    opened = {p: stores(p) for p in partitions} if stores is not None else {}
    try:
        out = await _replay(cfg, read, partitions, serving, opened)
    except BaseException:
        for store in opened.values():
            _close(store)
        raise
    return out


def _close(store: DedupStore) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


async def _replay(cfg: EngineConfig, read: LogReader, partitions: list[int], serving: ServingWriter | None,
                  opened: dict[int, DedupStore]) -> dict[int, Recovered]:
    tracking = await ServingRecovery.begin(serving, partitions) if serving is not None else None
    done, stale = await _pass(cfg, read, partitions, tracking, opened)
    if stale:
        for p in stale:
            log.warning("dedup store of partition %d does not match the state log: rebuilding it", p)
            opened[p].wipe()  # type: ignore[attr-defined]
        tracking = await ServingRecovery.begin(serving, stale) if serving is not None else None
        again, _ = await _pass(cfg, read, stale, tracking, opened)
        done.update(again)
    out = {}
    for p in partitions:
        rp, last_outbox, log_end, last_end = done[p]
        engine = rp.engine
        engine.outbox = []
        engine.transitions.clear()
        store = opened.get(p)
        if store is not None and hasattr(store, "commit"):
            store.replaying = False  # type: ignore[attr-defined]
            store.commit(log_end, check=last_end)
        out[p] = Recovered(engine, rp.offset, log_end, rp.applied, rp.skipped, last_outbox)
    return out


COMMIT_EVERY = 200_000  # ids staged while replaying before they are committed (bounds recovery's memory)
Replayed = tuple[Replayer, list[Closed], int, int | None]  # replayer, last outbox, log end, last record's end


async def _pass(cfg: EngineConfig, read: LogReader, partitions: list[int], tracking: ServingRecovery | None,
                opened: dict[int, DedupStore]) -> tuple[dict[int, Replayed], list[int]]:
    """One replay of ``partitions``.  Also returns the partitions whose dedup store on disk does not match
    the log (stale: their replay is to be discarded and done again with the store wiped)."""
    replayers = {p: Replayer(PartitionEngine(cfg, dedup=opened.get(p)), p) for p in partitions}
    last_outbox: dict[int, list[Closed]] = {p: [] for p in partitions}
    log_end = dict.fromkeys(partitions, 0)
    last_end: dict[int, int | None] = dict.fromkeys(partitions)
    # Stores on disk: the state-log position they hold the ids up to, and the record end they committed with.
    disk: dict[int, tuple[int, int | None]] = {}
    for p in partitions:
        store = opened.get(p)
        if store is not None and hasattr(store, "commit"):
            store.replaying = False  # type: ignore[attr-defined]
            if store.position is not None:  # type: ignore[attr-defined]
                disk[p] = (store.position, store.check)  # type: ignore[attr-defined]
    stale: set[int] = set()
    async for p, offset, record in read(partitions):
        rp = replayers[p]
        log_end[p] = offset + 1
        last_end[p] = record.end
        store = opened.get(p)
        at = disk.get(p)
        if at is not None:
            position, check = at
            store.replaying = offset < position  # type: ignore[union-attr]
            if offset == position - 1 and check is not None and record.end != check:
                stale.add(p)  # not the record the store committed with: another incarnation of the log
        if tracking is not None:
            tracking.before(p, record, rp.engine, offset)
        if rp.feed(record):
            last_outbox[p] = rp.engine.take_outbox()
        if at is not None or (store is not None and hasattr(store, "commit")):
            if not getattr(store, "replaying", True) and store.staged() >= COMMIT_EVERY:  # type: ignore[union-attr]
                store.commit(offset + 1, check=record.end)  # type: ignore[union-attr]
    for p, (position, _) in disk.items():
        if position > log_end[p]:
            stale.add(p)  # the log is shorter than what the store saw
    if tracking is not None:
        for p in partitions:
            if p not in stale:
                tracking.finish(p, replayers[p].engine, log_end[p])
    done = {p: (replayers[p], last_outbox[p], log_end[p], last_end[p]) for p in partitions}
    return done, sorted(stale)


async def replay_users(cfg: EngineConfig, read: LogReader, p: int) -> tuple[dict[str, list], int]:
    """Every user of partition ``p`` as of the end of its state log, from a fresh replay (data-loss repair).

    Returns the engine's touched users (lifetime revenue included) and the
    state-log position reached.
    """
    engine = PartitionEngine(cfg)
    engine.track_users = True
    rp = Replayer(engine, p)
    n = end = 0
    async for _, offset, record in read([p]):
        rp.feed(record)
        end = offset + 1
        n += 1
        if n % 8 == 0:
            await asyncio.sleep(0)  # the live stream keeps going meanwhile
    return engine.take_touched(), end


class ServingRecovery:
    """The serving side of :func:`replay_partitions` for the partitions being assigned.

    ``before`` switches change tracking on for the records past the stored
    position (all of them if it is unknown), ``finish`` submits the tracked users as one update
    from the stored position to the replay's end and leaves tracking on.
    Positions are state-log offsets: the record at offset ``o`` is reflected
    once the stored position is ``o + 1`` or more.
    """

    def __init__(self, writer: ServingWriter, partitions: list[int], known: dict[int, int | None] | None) -> None:
        self.writer = writer
        self.known = known
        if known is None:
            log.warning("serving layer unreachable while recovering partitions %s: every user of them will be "
                        "rewritten once it is back", partitions)

    @classmethod
    async def begin(cls, writer: ServingWriter, partitions: list[int]) -> ServingRecovery:
        writer.start()
        return cls(writer, partitions, await writer.read_offsets(partitions))

    def stored(self, p: int) -> int | None:
        return None if self.known is None else self.known.get(p)

    def before(self, p: int, record: Record, engine: PartitionEngine, offset: int) -> None:
        """``record`` (at state-log ``offset``) is about to be replayed."""
        stored = self.stored(p)
        engine.track_users = stored is None or offset >= stored

    def finish(self, p: int, engine: PartitionEngine, end: int) -> None:
        """The replay reached state-log position ``end`` (the offset after the partition's last record)."""
        stored = self.stored(p)
        if stored is None:
            start = RESET
        elif stored > end:
            log.error("serving layer position %d of partition %d is ahead of the state log (%d): it was written "
                      "by another deployment; overwriting (use a fresh redis.key_prefix per deployment)",
                      stored, p, end)
            start = FORCE
        else:
            start = stored
        engine.track_users = True
        self.writer.recovered(p, start, end, engine.take_touched())


async def read_log(bootstrap: str, topic: str, partitions: list[int]) -> AsyncIterator[tuple[int, int, Record]]:
    """Yield (partition, state-log offset, Record) for every record of ``partitions`` of ``topic``, in order.

    Refuses a log whose first records were deleted (retention): the partition's
    state could not be rebuilt from it.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tps = [TopicPartition(topic, p) for p in partitions]
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                              auto_offset_reset="earliest", max_partition_fetch_bytes=32 * 1024 * 1024,
                              fetch_max_bytes=64 * 1024 * 1024)
    await reader.start()
    try:
        reader.assign(tps)
        await reader.seek_to_beginning(*tps)
        ends = await reader.end_offsets(tps)
        for tp, first in (await reader.beginning_offsets(tps)).items():
            if first > 0:
                raise StateLogError(
                    f"state log {tp.topic}[{tp.partition}] starts at offset {first}: records were deleted "
                    "(retention), so the partition's state cannot be rebuilt. Set retention.ms=-1 on the "
                    "state log and backfill into a fresh deployment.")
        # Read to the end offsets, then until a poll comes back empty: some
        # brokers (Tansu) under-report the end offset.
        while True:
            got = await reader.getmany(timeout_ms=200, max_records=20000)
            for tp, msgs in got.items():
                for msg in msgs:
                    yield tp.partition, msg.offset, decode(msg.value)
            if not got:
                positions = [await reader.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps)):
                    break
    finally:
        await reader.stop()
