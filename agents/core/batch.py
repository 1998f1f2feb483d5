"""One batch of one input partition, as pure functions: decode, offer, advance, and the state-log record.

:func:`process_messages` is the worker's per-partition step (agents/worker/ingest.py
calls it on every poll; tests/pure_pipeline.py and the benchmarks call the same
function).  It takes a run of messages (anything with ``value``, ``headers`` and
``offset``, such as aiokafka's ``ConsumerRecord``), and returns a :class:`Batch`:
the :class:`Record` to write to the state log, the dead-letter and late
messages, and the :class:`Tally` for the Prometheus counters.  No I/O.

The state log holds one :class:`Record` per batch: exactly the inputs that
changed the partition's engine (the accepted events, already validated and
deduplicated, the wall-clock reading and marker that moved the watermark, the
per-reason refusal counts) and the source offsets it covers.  :func:`apply`
re-applies one record to an engine; recovery (agents/worker/recovery.py)
replays a partition's records in order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import msgspec

from kpimon.agents.core.effects import EFFECTS, add_flows
from kpimon.agents.core.engine import PartitionEngine
from kpimon.streams import topics as wire
from kpimon.streams.events import Decoder, Event, Reason, Rejected

RECORD_BYTES = 512 * 1024  # split a batch's state-log record above this much input
_type_of = attrgetter("type")


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


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


def encode(record: Record) -> bytes:
    return _encoder.encode(record)


def decode(data: bytes) -> Record:
    return _decoder.decode(data)


def apply(engine: PartitionEngine, record: Record) -> None:
    """Re-apply one record to an engine (recovery).  Mirrors :func:`process_messages`."""
    engine.offer_batch(record.events, check=False)
    totals = engine.totals
    totals.duplicates += record.duplicates
    totals.late += record.late
    for reason, n in record.rejected.items():
        totals.add_rejected(reason, n)
    engine.advance(clock=record.clock, marker=record.marker)


@dataclass
class Tally:
    """What one batch contributes to the Prometheus counters (money in minor units)."""

    types: dict[str, int] = field(default_factory=dict)
    signups: dict[str, int] = field(default_factory=dict)
    orders: int = 0
    invites: int = 0
    gross: int = 0  # purchase amounts (a counter only grows; refunds are counted apart)
    revenue: int = 0  # net of refunds (not exported: Prometheus counters cannot go down)
    refunds: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    late: int = 0


def _header(msg: Any, name: str) -> bytes | None:
    for key, value in msg.headers or ():
        if key == name:
            return value
    return None


class Batch:
    """The outcome of processing one run of messages from one partition."""

    __slots__ = ("record", "dlq", "late", "tally", "wm")

    def __init__(self, record: Record, dlq: list, late: list, tally: Tally, wm: int = 0) -> None:
        self.record = record
        self.dlq = dlq
        self.late = late
        self.tally = tally
        self.wm = wm  # the watermark the late events were refused against


def process_messages(engine: PartitionEngine, decoder: Decoder, msgs: Sequence[Any], pos: int,
                     start: int, clock: int | None,
                     channel_label: Callable[[str | None], str]) -> tuple[Batch, int]:
    """Process ``msgs[pos:]`` up to a watermark marker or the size limit.

    ``start`` is the source offset the record begins at (the end of the
    previous record, so that the state log forms an unbroken chain even across
    offsets the broker no longer has).  Returns the batch outcome and the
    position of the first message not taken.  No I/O: the caller sends what
    the batch carries.
    """
    decoded: list[Event] = []
    sources: list[Any] = []
    dlq: list[tuple[Any, Rejected]] = []
    marker = None
    size = 0
    decode = decoder.decode
    n = len(msgs)
    while pos < n:
        msg = msgs[pos]
        pos += 1
        value = msg.value
        if msg.headers:
            mark = _header(msg, wire.WATERMARK_HEADER)
            if mark is not None:
                try:
                    marker = int(mark)
                except ValueError:
                    dlq.append((msg, Rejected(Reason.INVALID_FIELD, f"bad {wire.WATERMARK_HEADER} header {mark!r}")))
                    continue
                break
        if value is None:
            dlq.append((msg, Rejected(Reason.NOT_JSON, "empty record (no value)")))
            continue
        try:
            decoded.append(decode(value))
        except Rejected as rej:
            dlq.append((msg, rej))
            continue
        sources.append(msg)
        size += len(value)
        if size >= RECORD_BYTES:
            break
    totals = engine.totals
    dups0 = totals.duplicates
    wm = engine.wm
    events, late_idx = engine.offer_batch(decoded)
    late = [sources[i] for i in late_idx]
    tally = Tally(types=dict(Counter(map(_type_of, events))), duplicates=totals.duplicates - dups0, late=len(late))
    for ev in events:
        code = ev.code
        if not code:
            continue
        eff = EFFECTS[code]  # what each event type does: agents/core/effects.py
        if eff.flows:
            add_flows(tally, code, ev.amount)
            tally.gross += eff.gross * ev.amount
        elif eff.signup:
            ch = channel_label(ev.channel)
            tally.signups[ch] = tally.signups.get(ch, 0) + 1
    rejected: dict[str, int] = {}
    for _, refusal in dlq:
        rejected[refusal.reason.value] = rejected.get(refusal.reason.value, 0) + 1
        totals.add_rejected(refusal.reason.value)
    tally.rejected = rejected
    if late_idx:
        wm = engine.wm
    engine.advance(clock=clock, marker=marker)
    record = Record(start, msgs[pos - 1].offset + 1, clock, marker, events, rejected, tally.duplicates,
                    tally.late, engine.cfg.fingerprint)
    return Batch(record, dlq, late, tally, wm), pos
