"""The worker's data path without Kafka: partitioner -> process_messages -> partition_outputs -> close_step.

``run_pipeline`` drives the worker's real steps: lines are keyed by
``user_id`` onto partitions, wrapped in ConsumerRecord-like objects with
consecutive offsets, processed by the real batch function
:func:`kpimon.agents.worker.ingest.process_messages` in small batches,
followed by one watermark marker record per partition.  After each batch the
partition's messages come from :func:`kpimon.agents.core.step.partition_outputs`
(closed periods, then progress with its open periods) and go through the JSON
wire format into :func:`kpimon.agents.core.step.close_step` on a dict-backed
:class:`Aggregator`, as ``IngestService._derived`` and the ``aggregate`` agent do.

``replay_records`` rebuilds an engine from the produced state-log records
(through the msgpack wire format) with :class:`agents.Replayer`.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from kpimon.agents.core.aggregate import Aggregator
from kpimon.agents.core.batch import Record, process_messages
from kpimon.agents.core.batch import decode as decode_record
from kpimon.agents.core.batch import encode as encode_record
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.core.step import close_step, partition_outputs
from kpimon.agents.worker.recovery import Replayer
from kpimon.streams import topics as wire
from kpimon.streams.events import Decoder, format_money

TOPIC = "kpimon.events"


@dataclass
class FakeRecord:
    """What process_messages reads from an aiokafka ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def user_id_of(line: bytes) -> str | None:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    uid = obj.get("user_id") if isinstance(obj, dict) else None
    return uid if isinstance(uid, str) else None


def partition_of_user(user_id: str | None, partitions: int) -> int:
    """Stable across processes (unlike ``hash``); no user_id -> partition 0."""
    if user_id is None:
        return 0
    return zlib.crc32(user_id.encode()) % partitions


def partition_of_line(line: bytes, partitions: int) -> int:
    return partition_of_user(user_id_of(line), partitions)


def partitioner(partitions: int):
    def part(ev: dict[str, Any]) -> int:
        uid = ev.get("user_id")
        return partition_of_user(uid if isinstance(uid, str) else None, partitions)
    return part


def marker_record(partition: int, offset: int, until_ms: int) -> FakeRecord:
    return FakeRecord(TOPIC, partition, offset, None, b"", [(wire.WATERMARK_HEADER, str(until_ms).encode())])


class PipelineReport(dict):
    """``{(grain, label): result}`` of the globally closed periods, with the run's by-products.

    Attributes: ``totals`` (the aggregator's totals), ``records`` (state-log
    records per partition, in order), ``engines`` (per partition),
    ``closed`` (the ClosedPeriod messages in emission order), ``watermark``.
    """

    totals: dict[str, Any]
    records: dict[int, list[Record]]
    engines: dict[int, PartitionEngine]
    closed: list[wire.ClosedPeriod]
    watermark: int | None
    late_offsets: dict[int, list[int]]
    dlq_offsets: dict[int, list[int]]
    partials: dict[int, list]  # the Closed items each engine put in its outbox, in order
    inputs: dict[int, list[FakeRecord]]  # the records of each partition (marker last)


def result_of(wire_metrics: dict[str, Any], settings: Any) -> dict[str, Any]:
    from kpimon.agents.core.metrics import PeriodMetrics

    decimals = settings.money.decimals
    return PeriodMetrics.from_wire(wire_metrics).result(settings.lifecycle.warning_state,
                                                        lambda v: format_money(v, decimals))


def run_pipeline(lines: list[bytes], settings: Any, partitions: int, until_ms: int, batch_size: int = 7,
                 redeliver: bool | str = False) -> PipelineReport:
    """Run ``lines`` (in this arrival order) through the worker's code path.

    ``redeliver``: False; True or ``"dedup"`` -- every batch is processed, then
    the very same records are processed again (at-least-once redelivery before
    the commit); ``process_messages`` does not skip offsets, so the copies go
    through the engine's dedup by event_id; ``"offsets"`` -- the redelivered
    records are first filtered by the source offset already reached, as
    ``IngestService.process`` does, so they never reach the engine.
    """
    if redeliver is True:
        redeliver = "dedup"
    assert redeliver in (False, "dedup", "offsets"), redeliver
    cfg = EngineConfig.from_settings(settings)
    decoder = Decoder(settings.money.decimals, min_epoch_ms=settings.min_epoch_ms)
    channel_label = settings.channel_label

    inputs: dict[int, list[FakeRecord]] = {p: [] for p in range(partitions)}
    for line in lines:
        uid = user_id_of(line)
        p = partition_of_user(uid, partitions)
        key = uid.encode() if uid is not None else None
        inputs[p].append(FakeRecord(TOPIC, p, len(inputs[p]), key, line))
    for p in range(partitions):
        inputs[p].append(marker_record(p, len(inputs[p]), until_ms))

    engines = {p: PartitionEngine(cfg) for p in range(partitions)}
    records: dict[int, list[Record]] = {p: [] for p in range(partitions)}
    late_offsets: dict[int, list[int]] = {p: [] for p in range(partitions)}
    dlq_offsets: dict[int, list[int]] = {p: [] for p in range(partitions)}
    next_offset: dict[int, int | None] = {p: None for p in range(partitions)}
    aggregator = Aggregator({}, {}, {})
    closed: list[wire.ClosedPeriod] = []
    marks: list[int] = []
    partials: dict[int, list] = {p: [] for p in range(partitions)}

    def publish(p: int) -> None:
        # The worker's own steps: partition_outputs (IngestService._derived), then close_step (the aggregate
        # agent), with every message through the JSON wire format.
        outputs = partition_outputs(engines[p], p, partitions, with_open=True)
        partials[p] += outputs.closed
        for msg in outputs.messages:
            decoded = wire.decode_partials(wire.json_encode(msg))
            step = close_step(aggregator, decoded)
            for out in step.publish:
                out = wire.decode_periods(wire.json_encode(out))
                if isinstance(out, wire.ClosedPeriod):
                    closed.append(out)
                else:
                    marks.append(out.watermark)
            aggregator.mark_published(step.mark)

    def process(p: int, msgs: list[FakeRecord]) -> None:
        start = next_offset[p]
        if start is None:
            start = msgs[0].offset
        pos = 0
        while pos < len(msgs):
            batch, pos = process_messages(engines[p], decoder, msgs, pos, start, None, channel_label)
            start = batch.record.end
            records[p].append(batch.record)
            late_offsets[p] += [m.offset for m in batch.late]
            dlq_offsets[p] += [m.offset for m, _ in batch.dlq]
        next_offset[p] = start
        publish(p)

    # Round-robin over partitions, one batch at a time (like a poll loop).
    pending = {p: list(inputs[p]) for p in range(partitions)}
    while any(pending.values()):
        for p in range(partitions):
            if not pending[p]:
                continue
            batch, pending[p] = pending[p][:batch_size], pending[p][batch_size:]
            process(p, batch)
            if redeliver == "dedup":
                process(p, batch)
            elif redeliver == "offsets":
                reached = next_offset[p]
                again = [m for m in batch if reached is None or m.offset >= reached]
                if again:
                    process(p, again)

    report = PipelineReport()
    for msg in closed:
        key = (msg.grain, msg.period)
        assert key not in report, f"period {key} emitted twice"
        report[key] = result_of(msg.metrics, settings)
    report.totals = aggregator.totals(partitions)
    report.records = records
    report.engines = engines
    report.closed = closed
    report.watermark = marks[-1] if marks else None
    report.late_offsets = late_offsets
    report.dlq_offsets = dlq_offsets
    report.partials = partials
    report.inputs = inputs
    return report


# --------------------------------------------------------------------------- #
# state-log replay


def replay_records(records: list[Record], settings: Any, *, through_wire: bool = True,
                   repeat_each: bool = False) -> tuple[PartitionEngine, Replayer, list]:
    """A fresh engine rebuilt from ``records``; returns (engine, replayer, everything it closed).

    ``repeat_each`` feeds every record twice in a row (a record written twice).
    """
    engine = PartitionEngine(EngineConfig.from_settings(settings))
    replayer = Replayer(engine)
    outbox: list = []
    for rec in records:
        copies = 2 if repeat_each else 1
        for _ in range(copies):
            r = decode_record(encode_record(rec)) if through_wire else rec
            if replayer.feed(r):
                outbox += engine.take_outbox()
    return engine, replayer, outbox


def engine_state(engine: PartitionEngine) -> dict[str, Any]:
    """Everything observable about an engine, for equality checks."""
    t = engine.totals
    return {
        "wm": engine.wm,
        "max_ts": engine.max_ts,
        "cursor": engine.cursor,
        "population": engine.population(),
        "active_in_windows": engine.active_in_windows(),
        "totals": {"accepted": t.accepted, "duplicates": t.duplicates, "late": t.late,
                   "rejected": dict(sorted(t.rejected.items()))},
        "users": dict(sorted(engine.users_state().items())),
        "zones": [list(z.items()) for z in engine.zones],
        "lifetime": dict(sorted(engine.lifetime.items())),
        "pending": engine.pending_state(),
        "pending_signups": sorted(engine.pending_signups.items()),
        "ahead": {start: m.to_wire() for start, m in sorted(engine.ahead.items())},
        "dedup": dict(sorted(engine.dedup.items())),
        "open": [(p.grain, p.label, m.to_wire()) for p, m in engine.open_metrics()],
    }


def closed_state(items: list) -> list[tuple[str, str, dict[str, Any]]]:
    return [(str(c.period.grain), c.period.label, c.metrics.to_wire()) for c in items]


def process_all(engine: PartitionEngine, settings: Any, msgs: list[FakeRecord], start: int,
                batch_size: int = 7) -> tuple[list[Record], list]:
    """Feed ``msgs`` to ``engine`` via process_messages, as a worker resuming at ``start``.

    Messages below ``start`` are dropped first (the worker's offset filter).
    Returns the state-log records written and everything the engine closed.
    """
    decoder = Decoder(settings.money.decimals, min_epoch_ms=settings.min_epoch_ms)
    msgs = [m for m in msgs if m.offset >= start]
    records: list[Record] = []
    outbox: list = []
    for i in range(0, len(msgs), batch_size):
        chunk = msgs[i:i + batch_size]
        pos = 0
        while pos < len(chunk):
            batch, pos = process_messages(engine, decoder, chunk, pos, start, None, settings.channel_label)
            start = batch.record.end
            records.append(batch.record)
        outbox += engine.take_outbox()
    return records, outbox
