"""The ingest service: batch consumption of ``kpimon.events`` into partition engines.

faust's per-message path costs ~90 µs of CPU per event (docs/performance.md),
so the hot path does not go through a faust stream.  This service runs inside
the faust app (``app.service``) and consumes with aiokafka ``getmany`` in its
own consumer group, one batch per partition per poll:

1. decode each message (msgspec), refuse bad ones to the DLQ, offer the rest
   to the partition's engine (dedup, lateness);
2. advance the watermark and let the engine apply what became final;
3. write the dead-letter and late records, then the partition's state-log
   record (the batch's accepted inputs), then the derived outputs (closed
   period partials and progress) -- in that order, each awaited;
4. commit the source offsets (for lag tooling; recovery trusts the state log).

On assignment a partition's engine is rebuilt from the state log and the
consumer seeks to the offset the log reached, so after a crash every event is
applied exactly once.  On revocation the current batch finishes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from agents import statelog
from agents.core.engine import ACCEPTED, LATE, EngineConfig, PartitionEngine
from agents.exporter import KpimonMetrics, Tally
from streams import admin
from streams import topics as wire
from streams.events import INVITE, PURCHASE, REFUND, SIGNUP, Decoder, Event, Reason, Rejected
from streams.topics import Topics

log = logging.getLogger("kpimon.ingest")

RECORD_BYTES = 512 * 1024  # split a batch's state-log record above this much input


def _header(msg: ConsumerRecord, name: str) -> bytes | None:
    for key, value in msg.headers or ():
        if key == name:
            return value
    return None


class Batch:
    """The outcome of processing one run of messages from one partition."""

    __slots__ = ("record", "dlq", "late", "tally")

    def __init__(self, record: statelog.Record, dlq: list, late: list, tally: Tally) -> None:
        self.record = record
        self.dlq = dlq
        self.late = late
        self.tally = tally


def process_messages(engine: PartitionEngine, decoder: Decoder, msgs: list[ConsumerRecord], pos: int,
                     start: int, clock: int | None, channel_label) -> tuple[Batch, int]:  # noqa: ANN001
    """Process ``msgs[pos:]`` up to a watermark marker or the size limit.

    ``start`` is the source offset the record begins at (the end of the
    previous record, so that the state log forms an unbroken chain even across
    offsets the broker no longer has).  Returns the batch outcome and the
    position of the first message not taken.  No I/O: the caller sends what
    the batch carries.
    """
    events: list[Event] = []
    dlq: list[tuple[ConsumerRecord, Rejected]] = []
    late: list[ConsumerRecord] = []
    tally = Tally()
    types = tally.types
    dups0, late0 = engine.totals.duplicates, engine.totals.late
    marker = None
    size = 0
    decode = decoder.decode
    offer = engine.offer
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
        try:
            if value is None:
                raise Rejected(Reason.NOT_JSON, "empty record (no value)")
            ev = decode(value)
        except Rejected as rej:
            dlq.append((msg, rej))
            continue
        status = offer(ev)
        if status == ACCEPTED:
            events.append(ev)
            types[ev.type] = types.get(ev.type, 0) + 1
            code = ev.code
            if code:
                if code == PURCHASE:
                    tally.orders += 1
                    tally.revenue += ev.amount
                elif code == SIGNUP:
                    ch = channel_label(ev.channel)
                    tally.signups[ch] = tally.signups.get(ch, 0) + 1
                elif code == REFUND:
                    tally.refunds += ev.amount
                elif code == INVITE:
                    tally.invites += 1
            size += len(value)
            if size >= RECORD_BYTES:
                break
        elif status == LATE:
            late.append(msg)
    rejected: dict[str, int] = {}
    for _, rej in dlq:
        rejected[rej.reason.value] = rejected.get(rej.reason.value, 0) + 1
        engine.totals.add_rejected(rej.reason.value)
    tally.rejected = rejected
    tally.duplicates = engine.totals.duplicates - dups0
    tally.late = engine.totals.late - late0
    engine.advance(clock=clock, marker=marker)
    record = statelog.Record(start, msgs[pos - 1].offset + 1, clock, marker, events, rejected, tally.duplicates,
                             tally.late)
    return Batch(record, dlq, late, tally), pos


class _Listener(ConsumerRebalanceListener):
    def __init__(self, service: IngestService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.service.release([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.service.recover([tp.partition for tp in assigned])


class IngestService:
    """Owns the consumer, the producer and one engine per assigned partition."""

    def __init__(self, settings: Any, metrics: KpimonMetrics | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.kafka.topic_prefix, settings.worker.app_id)
        self.cfg = EngineConfig.from_settings(settings)
        self.decoder = Decoder(settings.money.decimals)
        self.metrics = metrics
        self.live = settings.worker.clock == "live"
        self.engines: dict[int, PartitionEngine] = {}
        self.offsets: dict[int, int | None] = {}  # next source offset per owned partition
        self.partitions = 0
        self.group_id = f"{settings.kafka.topic_prefix}{settings.worker.app_id}-core"
        self._lock = asyncio.Lock()
        self._last_tick = 0.0
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self.tick_s = settings.worker.tick_interval / 1000
        self.batches = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        bootstrap = self.settings.kafka.bootstrap
        w = self.settings.worker
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, acks="all",
                                         max_request_size=16 * 1024 * 1024, enable_idempotence=False)
        await self.producer.start()
        session = w.session_timeout
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=self.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=session, heartbeat_interval_ms=max(100, session // 4),
            rebalance_timeout_ms=max(session, 30000), max_poll_interval_ms=300000,
            max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024,
        )
        await self.consumer.start()
        # Creates what is missing and tells the partition count of the input.
        self.partitions = await asyncio.to_thread(admin.ensure_topics, bootstrap, self.topics,
                                                  self.settings.kafka.partitions)
        self.consumer.subscribe([self.topics.events], listener=_Listener(self))

    async def stop(self) -> None:
        self._stopping.set()
        async with self._lock:
            if self.consumer is not None:
                await self.consumer.stop()
            if self.producer is not None:
                await self.producer.stop()

    async def run(self) -> None:
        """Poll-process loop; returns when :meth:`stop` is called."""
        assert self.consumer is not None
        w = self.settings.worker
        while not self._stopping.is_set():
            try:
                batch = await self.consumer.getmany(timeout_ms=w.poll_timeout, max_records=w.batch_max_records)
            except Exception:  # consumer stopped under us
                if self._stopping.is_set():
                    return
                raise
            async with self._lock:
                if self._stopping.is_set():
                    return
                commit = await self.process(batch)
            if commit:
                # Outside the lock: a commit can wait for a rebalance whose
                # listener needs the lock.  The state log is the truth for
                # recovery; committed offsets only serve lag tooling.
                try:
                    await asyncio.wait_for(self.consumer.commit(commit), timeout=10)
                except Exception as err:  # noqa: BLE001
                    log.info("offset commit skipped: %s", err)

    # ------------------------------------------------------------------ process
    async def process(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> dict[TopicPartition, int]:
        """Process one poll; returns the source offsets to commit."""
        clock = int(time.time() * 1000) if self.live else None
        results: list[tuple[int, Batch]] = []
        for tp, msgs in batch.items():
            engine = self.engines.get(tp.partition)
            if engine is None or not msgs:  # revoked meanwhile
                continue
            pos = 0
            start = self.offsets.get(tp.partition)
            if start is None:
                start = msgs[0].offset
            elif msgs[0].offset < start:
                # A fetch that raced a seek (aiokafka can hand out records from
                # before the position we sought to): never process twice.
                msgs = [m for m in msgs if m.offset >= start]
                if not msgs:
                    continue
            while pos < len(msgs):
                out, pos = process_messages(engine, self.decoder, msgs, pos, start, clock, self.settings.channel_label)
                start = out.record.end
                results.append((tp.partition, out))
        if self.live and time.monotonic() - self._last_tick >= self.tick_s:
            self._last_tick = time.monotonic()
            busy = {tp.partition for tp in batch}
            for p, engine in self.engines.items():
                if p not in busy and self.offsets.get(p) is not None:
                    off = self.offsets[p]
                    engine.advance(clock=clock)
                    results.append((p, Batch(statelog.Record(off, off, clock, None, [], {}, 0, 0), [], [], Tally())))
        if not results:
            return {}
        return await self._emit(results)

    async def _emit(self, results: list[tuple[int, Batch]]) -> dict[TopicPartition, int]:
        producer = self.producer
        assert producer is not None
        t = self.topics
        futures = []
        for p, out in results:
            for msg, rej in out.dlq:
                headers = [(wire.H_REASON, rej.reason.value.encode()), (wire.H_DETAIL, rej.detail.encode()[:1024]),
                           (wire.H_TOPIC, msg.topic.encode()), (wire.H_PARTITION, str(p).encode()),
                           (wire.H_OFFSET, str(msg.offset).encode())]
                futures.append(await producer.send(t.dlq, value=msg.value, key=msg.key, headers=headers))
                log.warning("rejected event at %s[%d]@%d: %s: %s", msg.topic, p, msg.offset, rej.reason.value,
                            rej.detail)
            for msg in out.late:
                headers = [(wire.H_TOPIC, msg.topic.encode()), (wire.H_PARTITION, str(p).encode()),
                           (wire.H_OFFSET, str(msg.offset).encode()),
                           (wire.H_WATERMARK, str(self.engines[p].wm).encode())]
                futures.append(await producer.send(t.late, value=msg.value, key=msg.key, headers=headers))
        if futures:
            await asyncio.gather(*futures)
        futures = []
        for p, out in results:
            futures.append(await producer.send(t.state_log, value=statelog.encode(out.record), partition=p))
        await asyncio.gather(*futures)
        # The inputs are durable: publish what they produced.
        futures = []
        touched: dict[int, int] = {}
        for p, out in results:
            touched[p] = out.record.end
            self.offsets[p] = out.record.end
            if self.metrics is not None:
                self.metrics.observe(out.tally)
        for p in touched:
            futures.extend(await self._publish(p))
        if futures:
            await asyncio.gather(*futures)
        if self.metrics is not None:
            for p in touched:
                self.metrics.observe_transitions(self.engines[p].take_transitions())
        self.batches += 1
        return {TopicPartition(t.events, p): off for p, off in touched.items()}

    async def _publish(self, p: int) -> list:
        """Send the partition's newly closed periods, then its progress."""
        producer = self.producer
        assert producer is not None
        engine = self.engines[p]
        futures = []
        for closed in engine.take_outbox():
            period = closed.period
            msg = wire.Partial(p, self.partitions, str(period.grain), period.label, period.start_ms, period.end_ms,
                               closed.metrics.to_wire())
            futures.append(await producer.send(self.topics.partials, value=wire.json_encode(msg),
                                               key=f"{period.grain}/{period.label}".encode(), partition=0))
        tot = engine.totals
        progress = wire.Progress(p, self.partitions, engine.wm, {
            "accepted": tot.accepted, "rejected": dict(tot.rejected), "duplicates": tot.duplicates, "late": tot.late})
        futures.append(await producer.send(self.topics.partials, value=wire.json_encode(progress),
                                           key=f"progress/{p}".encode(), partition=0))
        return futures

    # ---------------------------------------------------------------- rebalance
    async def release(self, partitions: list[int]) -> None:
        async with self._lock:
            for p in partitions:
                self.engines.pop(p, None)
                self.offsets.pop(p, None)
            if partitions:
                log.info("released partitions %s", partitions)

    async def recover(self, partitions: list[int]) -> None:
        """Rebuild the engines of newly assigned partitions from the state log."""
        if not partitions:
            return
        async with self._lock:
            started = time.monotonic()
            replayers = {p: statelog.Replayer(PartitionEngine(self.cfg)) for p in partitions}
            last_outbox: dict[int, list] = {p: [] for p in partitions}
            async for p, record in self._read_state_log(partitions):
                rp = replayers[p]
                if rp.feed(record):
                    last_outbox[p] = rp.engine.take_outbox()
            assert self.consumer is not None
            for p, rp in replayers.items():
                engine = rp.engine
                # Re-publish what the last record closed: it may not have left
                # before the previous owner stopped (idempotent downstream).
                engine.outbox = last_outbox[p]
                engine.transitions.clear()
                self.engines[p] = engine
                tp = TopicPartition(self.topics.events, p)
                if rp.offset is None:
                    await self.consumer.seek_to_beginning(tp)
                    self.offsets[p] = await self.consumer.position(tp)
                else:
                    self.consumer.seek(tp, rp.offset)
                    self.offsets[p] = rp.offset
                if rp.applied:
                    await asyncio.gather(*await self._publish(p))
                log.info("recovered partition %d: %d records applied, %d skipped, offset %s, %d users",
                         p, rp.applied, rp.skipped, rp.offset, len(engine.users))
            log.info("recovered %d partitions in %.2fs", len(partitions), time.monotonic() - started)

    async def _read_state_log(self, partitions: list[int]):  # noqa: ANN202 - async generator
        """Yield (partition, Record) for every state-log record of these partitions, in order."""
        tps = [TopicPartition(self.topics.state_log, p) for p in partitions]
        reader = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap, enable_auto_commit=False,
                                  auto_offset_reset="earliest", max_partition_fetch_bytes=32 * 1024 * 1024,
                                  fetch_max_bytes=64 * 1024 * 1024)
        await reader.start()
        try:
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            ends = await reader.end_offsets(tps)
            # Read to the end offsets, then until a poll comes back empty: some
            # brokers (Tansu) under-report the end offset.
            while True:
                got = await reader.getmany(timeout_ms=200, max_records=20000)
                for tp, msgs in got.items():
                    for msg in msgs:
                        yield tp.partition, statelog.decode(msg.value)
                if not got:
                    positions = [await reader.position(tp) for tp in tps]
                    if all(pos >= ends[tp] for pos, tp in zip(positions, tps)):
                        break
        finally:
            await reader.stop()

    def owned_engines(self) -> list[PartitionEngine]:
        return list(self.engines.values())

