"""The state log: one record per processed batch of one input partition.

A record holds exactly the inputs that changed the partition's engine: the
accepted events (already validated and deduplicated), the wall-clock reading
and marker that moved the watermark, the per-reason refusal counts, and the
source offsets it covers.  It is written to partition *p* of the state-log
topic before any derived output (period partials, progress) leaves the worker.

Recovery replays the records of partition *p* in order.  A record is applied
only if its ``start`` equals the offset the replay has reached, so a record
written twice (a producer retry, or a worker fenced out during a rebalance)
is applied once.  The engine is deterministic, so replay rebuilds exactly the
state the previous owner had, and the consumer then seeks the input partition
to the record's ``end``: nothing is lost and nothing is counted twice.

Why not Kafka transactions?  faust's ``exactly_once`` has known bugs
(faust-streaming #323, #517, #606) and the embedded Tansu broker does not
support transactions at all; one self-describing record per batch is atomic on
every Kafka-protocol broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from kpimon.agents.core.engine import PartitionEngine
from kpimon.errors import KpimonError
from kpimon.streams.events import Event


class Record(msgspec.Struct, array_like=True, gc=False):
    start: int  # first source offset covered
    end: int  # next source offset to read after this record
    clock: int | None  # wall-clock reading (ms) applied after the events, live mode
    marker: int | None  # explicit watermark marker applied after the events
    events: list[Event]
    rejected: dict[str, int]
    duplicates: int
    late: int
    config: str = ""  # fingerprint of the settings the record was computed under


class StateLogError(KpimonError):
    """The state log cannot rebuild this partition's state; the message says why and what to do."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


def encode(record: Record) -> bytes:
    return _encoder.encode(record)


def decode(data: bytes) -> Record:
    return _decoder.decode(data)


def apply(engine: PartitionEngine, record: Record) -> None:
    """Re-apply one record to an engine (recovery).  Mirrors the live path."""
    engine.offer_batch(record.events, check=False)
    totals = engine.totals
    totals.duplicates += record.duplicates
    totals.late += record.late
    for reason, n in record.rejected.items():
        totals.add_rejected(reason, n)
    engine.advance(clock=record.clock, marker=record.marker)


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
