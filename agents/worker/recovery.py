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
from kpimon.agents.core.engine import Closed, EngineConfig, PartitionEngine
from kpimon.agents.serving.lua import FORCE, RESET
from kpimon.agents.serving.updates import add_revenue
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


async def replay_partitions(cfg: EngineConfig, read: LogReader, partitions: list[int],
                            serving: ServingWriter | None = None) -> dict[int, Recovered]:
    """Rebuild the engines of ``partitions`` from the state log (and the serving layer's users, if given).

    The last applied record's closed periods are kept in ``last_outbox``: they
    may not have left before the previous owner stopped, and re-publishing them
    is idempotent downstream.
    """
    replayers = {p: Replayer(PartitionEngine(cfg), p) for p in partitions}
    last_outbox: dict[int, list[Closed]] = {p: [] for p in partitions}
    tracking = await ServingRecovery.begin(serving, partitions) if serving is not None else None
    log_end = dict.fromkeys(partitions, 0)
    async for p, offset, record in read(partitions):
        rp = replayers[p]
        log_end[p] = offset + 1
        if tracking is not None:
            tracking.before(p, record, rp.engine, offset)
        if rp.feed(record):
            last_outbox[p] = rp.engine.take_outbox()
            if tracking is not None:
                tracking.applied(p, record)
    out = {}
    for p, rp in replayers.items():
        engine = rp.engine
        engine.outbox = []
        engine.transitions.clear()
        if tracking is not None:
            tracking.finish(p, engine, log_end[p])
        out[p] = Recovered(engine, rp.offset, log_end[p], rp.applied, rp.skipped, last_outbox[p])
    return out


async def replay_users(cfg: EngineConfig, read: LogReader, p: int) -> tuple[dict[str, list], dict[str, int], int]:
    """Every user of partition ``p`` as of the end of its state log, from a fresh replay (data-loss repair).

    Returns the engine's touched users, their lifetime net revenue (minor
    units, events not applied yet excluded) and the state-log position reached.
    """
    engine = PartitionEngine(cfg)
    engine.track_users = True
    rp = Replayer(engine, p)
    revenue: dict[str, int] = {}
    n = end = 0
    async for _, offset, record in read([p]):
        if rp.feed(record):
            add_revenue(revenue, record.events)
        end = offset + 1
        n += 1
        if n % 8 == 0:
            await asyncio.sleep(0)  # the live stream keeps going meanwhile
    add_revenue(revenue, engine.buffered(), -1)  # accepted, not yet applied
    return engine.take_touched(), revenue, end


class ServingRecovery:
    """The serving side of :func:`replay_partitions` for the partitions being assigned.

    ``before`` switches change tracking on for the records past the stored
    position (all of them if it is unknown), ``applied`` sums the revenue of
    every replayed record, ``finish`` submits the tracked users as one update
    from the stored position to the replay's end and leaves tracking on.
    Positions are state-log offsets: the record at offset ``o`` is reflected
    once the stored position is ``o + 1`` or more.
    """

    def __init__(self, writer: ServingWriter, partitions: list[int], known: dict[int, int | None] | None) -> None:
        self.writer = writer
        self.known = known
        self.revenue: dict[int, dict[str, int]] = {p: {} for p in partitions}
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

    def applied(self, p: int, record: Record) -> None:
        add_revenue(self.revenue[p], record.events)

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
        revenue = self.revenue[p]
        add_revenue(revenue, engine.buffered(), -1)  # accepted, not yet applied
        engine.track_users = True
        self.writer.recovered(p, start, end, engine.take_touched(), revenue)


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
