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

import msgspec

from agents.core.engine import PartitionEngine
from streams.events import Event


class Record(msgspec.Struct, array_like=True, gc=False):
    start: int  # first source offset covered
    end: int  # next source offset to read after this record
    clock: int | None  # wall-clock reading (ms) applied after the events, live mode
    marker: int | None  # explicit watermark marker applied after the events
    events: list[Event]
    rejected: dict[str, int]
    duplicates: int
    late: int


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

    def __init__(self, engine: PartitionEngine) -> None:
        self.engine = engine
        self.offset: int | None = None  # next source offset to read
        self.applied = 0
        self.skipped = 0

    def feed(self, record: Record) -> bool:
        if self.offset is not None and record.start != self.offset:
            self.skipped += 1
            return False
        apply(self.engine, record)
        self.offset = record.end
        self.applied += 1
        return True
