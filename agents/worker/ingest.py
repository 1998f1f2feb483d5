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
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from kpimon.agents.core import checkpoint
from kpimon.agents.core.batch import Batch, Record, Tally, process_messages
from kpimon.agents.core.batch import encode as encode_record
from kpimon.agents.core.dedup import DedupRule, DedupStore, MemoryDedup
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.core.step import message_key, partition_outputs
from kpimon.agents.metrics.exporter import KpimonMetrics
from kpimon.agents.worker import recovery
from kpimon.agents.worker.checkpoints import Checkpointer
from kpimon.streams import admin
from kpimon.streams import topics as wire
from kpimon.streams.events import Decoder
from kpimon.streams.topics import Topics

log = logging.getLogger("kpimon.ingest")

OPEN_EVERY_S = 2.0  # how often a partition's progress carries its open periods (live KPIs)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, service: IngestService) -> None:
        self.service = service

    # aiokafka logs and swallows a listener's exception; keep it for the poll loop to raise.
    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        try:
            await self.service.release([tp.partition for tp in revoked])
        except Exception as err:  # noqa: BLE001 - kept for the poll loop to raise (aiokafka would swallow it)
            self.service.fatal = err

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        try:
            await self.service.recover([tp.partition for tp in assigned])
        except Exception as err:  # noqa: BLE001 - kept for the poll loop to raise (aiokafka would swallow it)
            self.service.fatal = err


class IngestService:
    """Owns the consumer, the producer and one engine per assigned partition."""

    def __init__(self, settings: Any, metrics: KpimonMetrics | None = None, serving: Any = None,
                 instance_id: str | None = None) -> None:
        self.settings = settings
        self.instance_id = instance_id  # the consumer's group.instance.id (static membership), or None
        self.topics = Topics(settings.kafka.topic_prefix, settings.worker.app_id)
        self.cfg = EngineConfig.from_settings(settings)
        self.decoder = Decoder(settings.money.decimals, min_epoch_ms=settings.min_epoch_ms)
        self.metrics = metrics
        # The serving layer in Redis (agents/serving/writer.py): fed after each state-log record is acknowledged.
        if serving is None and settings.redis.enabled:
            from kpimon.agents.serving.writer import ServingWriter

            serving = ServingWriter(settings, metrics.registry if metrics is not None else None)
        self.serving = serving or None
        if self.serving is not None:
            self.serving.attach(self)
        self.live = settings.worker.clock == "live"
        self.engines: dict[int, PartitionEngine] = {}
        self.offsets: dict[int, int | None] = {}  # next source offset per owned partition
        # Serving layer: per owned partition, the state-log position (the offset after the last record of the
        # partition this worker knows of).  Updates of Redis are ranges of these positions: every record, a
        # clock-only tick included, has its own, so a tick that changed users is never taken for a repeat.
        self.log_pos: dict[int, int] = {}
        self.partitions = 0
        self.group_id = f"{settings.kafka.topic_prefix}{settings.worker.app_id}-core"
        self._lock = asyncio.Lock()
        self._last_tick = 0.0
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self._stopping = asyncio.Event()
        self.tick_s = settings.worker.tick_interval / 1000
        self._open_sent: dict[int, float] = {}
        self.batches = 0
        self._inflight: asyncio.Future | None = None
        self.fatal: BaseException | None = None  # a failure in a rebalance callback
        # Checkpoints of the engines (agents/worker/checkpoints.py): bounded recovery and state log.
        self.checkpointer = Checkpointer(settings, self.topics, DedupRule(self.cfg.dedup_horizon))

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        bootstrap = self.settings.kafka.bootstrap
        w = self.settings.worker
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, acks="all",
                                         max_request_size=16 * 1024 * 1024, enable_idempotence=False)
        await self.producer.start()
        session = w.session_timeout
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=self.group_id, group_instance_id=self.instance_id,
            enable_auto_commit=False,
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
            try:
                await self.settle()
                await self.checkpointer.drain()
            except Exception:
                log.exception("writes in flight failed while stopping")
            if self.serving is not None:
                await self.serving.stop()  # what it cannot write, the partitions' next owner rewrites
            self._close_stores(list(self.engines))
            if self.consumer is not None:
                await self.consumer.stop()
            if self.producer is not None:
                await self.producer.stop()

    async def run(self) -> None:
        """Poll-process loop; returns when :meth:`stop` is called."""
        assert self.consumer is not None
        w = self.settings.worker
        loop = asyncio.get_running_loop()
        linger = w.poll_linger / 1000
        polled = 0.0
        full = True
        while not self._stopping.is_set():
            if self.fatal is not None:
                raise self.fatal
            if not full and linger:
                # The last poll was not full: let records gather (fewer, larger batches while the worker keeps up).
                wait = polled + linger - loop.time()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._stopping.wait(), wait)
                    except TimeoutError:
                        pass
                    continue
            polled = loop.time()
            try:
                batch = await self.consumer.getmany(timeout_ms=w.poll_timeout, max_records=w.batch_max_records)
            except Exception:  # consumer stopped under us
                if self._stopping.is_set():
                    return
                raise
            full = sum(len(msgs) for msgs in batch.values()) >= w.batch_max_records
            async with self._lock:
                if self._stopping.is_set():
                    return
                if self.fatal is not None:
                    raise self.fatal
                commit = await self.process(batch)
            if commit:
                # Outside the lock: a commit can wait for a rebalance whose
                # listener needs the lock.  The state log is the truth for
                # recovery; committed offsets only serve lag tooling.
                try:
                    await asyncio.wait_for(self.consumer.commit(commit), timeout=10)
                except Exception as err:  # noqa: BLE001 - best effort: the state log, not the commit, is the truth
                    log.info("offset commit skipped: %s", err)

    # ------------------------------------------------------------------ process
    async def process(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> dict[TopicPartition, int]:
        """Process one poll, then hand its writes to a background task.

        The writes of poll N overlap the processing of poll N+1, but poll N+1's
        writes start only after poll N's are all acknowledged, so the order
        DLQ/late -> state log -> derived outputs holds across polls too.
        Returns the source offsets of the previous poll, now durable, to commit.
        """
        now = int(time.time() * 1000)
        clock = now if self.live else None
        self.decoder.max_ts = now + self.settings.max_future
        results: list[tuple[int, Batch]] = []
        seals: list[int | None] = []  # per result: its generation in the partition's dedup store on disk
        # The users each record changed, in the order of ``results``, for the serving layer
        serving: list[dict] | None = [] if self.serving is not None else None
        offsets = self.offsets
        for tp, msgs in batch.items():
            p = tp.partition
            engine = self.engines.get(p)
            if engine is None or not msgs:  # revoked meanwhile
                continue
            pos = 0
            start = offsets.get(p)
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
                start = offsets[p] = out.record.end
                results.append((p, out))
                seals.append(self._seal(engine))
                if serving is not None:
                    serving.append(engine.take_touched())
        if self.live and time.monotonic() - self._last_tick >= self.tick_s:
            self._last_tick = time.monotonic()
            busy = {tp.partition for tp in batch}
            for p, engine in self.engines.items():
                off = offsets.get(p)
                if p not in busy and off is not None:
                    engine.advance(clock=clock)
                    tick = Record(off, off, clock, None, [], {}, 0, 0, self.cfg.fingerprint)
                    results.append((p, Batch(tick, [], [], Tally())))
                    seals.append(self._seal(engine))
                    if serving is not None:
                        # Users whose buffered events the clock made final, or who aged into a new state: the
                        # record's source range is empty, its state-log position is its own (see _write).
                        serving.append(engine.take_touched())
        if not results:
            return await self.settle()
        touched = dict.fromkeys(p for p, _ in results)
        derived = {p: self._derived(p) for p in touched}
        # Checkpoints due: captured now, consistent with the last record of each partition in this poll (the
        # next poll changes the engines while these writes are in flight); written once those are durable.
        counts: dict[int, int] = {}
        for p, _ in results:
            counts[p] = counts.get(p, 0) + 1
        snaps = {p: (checkpoint.take(e, p, offsets.get(p)), e.max_ts, e.wm)
                 for p, n in counts.items() if self.checkpointer.due(p, n) for e in (self.engines[p],)}
        commit = await self.settle()
        self._inflight = asyncio.ensure_future(self._write(results, derived, serving, seals, snaps))
        return commit

    @staticmethod
    def _seal(engine: PartitionEngine) -> int | None:
        """Close the dedup store's generation of the record just made (stores on disk only)."""
        seal = getattr(engine.dedup_store, "seal", None)
        return seal() if seal is not None else None

    def _open_store(self, p: int) -> DedupStore:
        """Partition ``p``'s dedup store: on disk under ``worker.state_dir`` (or in memory, ``dedup_store: memory``)."""
        w = self.settings.worker
        if w.dedup_store == "memory":
            return MemoryDedup(self.cfg.dedup_horizon)
        from kpimon.agents.worker.dedup_store import open_partition_store

        name = f"{self.settings.kafka.topic_prefix}{w.app_id}"
        identity = f"{self.topics.state_log}[{p}] {self.cfg.fingerprint}"
        return open_partition_store(w.state_dir, name, p, identity, self.cfg.dedup_horizon)

    def _close_stores(self, partitions: Iterable[int]) -> None:
        from kpimon.agents.worker.dedup_store import close_store

        for p in partitions:
            engine = self.engines.get(p)
            if engine is not None:
                close_store(engine.dedup_store)

    async def settle(self) -> dict[TopicPartition, int]:
        """Wait for the writes in flight (re-raising their failure, and a failed checkpoint's); their offsets
        to commit.  Checkpoints still being written are not waited for."""
        self.checkpointer.check()
        task, self._inflight = self._inflight, None
        if task is None:
            return {}
        return await task

    def _derived(self, p: int) -> tuple[list[tuple[bytes, bytes]], dict]:
        """Messages for the partials topic (closed periods, then progress) and transitions, as of now."""
        engine = self.engines[p]
        now = time.monotonic()
        with_open = now - self._open_sent.get(p, 0.0) >= OPEN_EVERY_S
        if with_open:
            self._open_sent[p] = now
        outputs = partition_outputs(engine, p, self.partitions, with_open)
        return [(message_key(m), wire.json_encode(m)) for m in outputs.messages], engine.take_transitions()

    async def _send_all(self, items: list[tuple[str, dict]]) -> list:
        """Send and wait for every acknowledgement; the RecordMetadata of each item, in order."""
        producer = self.producer
        assert producer is not None
        futures = [await producer.send(topic, **kwargs) for topic, kwargs in items]
        if futures:
            return list(await asyncio.gather(*futures))
        return []

    async def _write(self, results: list[tuple[int, Batch]], derived: dict[int, tuple],
                     serving: list[dict] | None = None,
                     seals: list[int | None] | None = None,
                     snaps: dict[int, tuple[bytes, int, int]] | None = None) -> dict[TopicPartition, int]:
        t = self.topics
        side = []
        for p, out in results:
            for msg, rej in out.dlq:
                headers = [(wire.H_REASON, rej.reason.value.encode()), (wire.H_DETAIL, rej.detail.encode()[:1024]),
                           (wire.H_TOPIC, msg.topic.encode()), (wire.H_PARTITION, str(p).encode()),
                           (wire.H_OFFSET, str(msg.offset).encode())]
                side.append((t.dlq, {"value": msg.value, "key": msg.key, "headers": headers}))
                log.warning("rejected event at %s[%d]@%d: %s: %s", msg.topic, p, msg.offset, rej.reason.value,
                            rej.detail)
            wm = str(out.wm).encode()
            for msg in out.late:
                headers = [(wire.H_TOPIC, msg.topic.encode()), (wire.H_PARTITION, str(p).encode()),
                           (wire.H_OFFSET, str(msg.offset).encode()), (wire.H_WATERMARK, wm)]
                side.append((t.late, {"value": msg.value, "key": msg.key, "headers": headers}))
        await self._send_all(side)
        acks = await self._send_all([(t.state_log, {"value": encode_record(out.record), "partition": p})
                                     for p, out in results])
        if seals:
            # The records are durable: their ids may now be persisted in the dedup stores on disk, each
            # partition up to its last record of this write (state-log position = its offset + 1).
            last: dict[int, tuple[int, int, int]] = {}
            for (p, out), ack, seal in zip(results, acks, seals):
                if seal is not None:
                    last[p] = (ack.offset + 1, seal, out.record.end)
            for p, (position, seal, end) in last.items():
                engine = self.engines.get(p)
                store = engine.dedup_store if engine is not None else None
                if store is not None and not getattr(store, "closed", True):
                    store.commit(position, upto=seal, check=end)  # type: ignore[attr-defined]
        if serving and self.serving is not None:
            # The records are durable: queue their users for Redis (never waits for it), each record as the
            # range of state-log positions from the previous record of its partition to its own offset + 1.
            log_pos = self.log_pos
            for (p, _), ack, touched in zip(results, acks, serving):
                end = ack.offset + 1
                self.serving.submit(p, log_pos.get(p, ack.offset), end, touched)
                log_pos[p] = end
        # The inputs are durable: publish what they produced.
        if self.metrics is not None:
            for _, out in results:
                self.metrics.observe(out.tally)
        await self._send_all([(t.partials, {"key": key, "value": value, "partition": 0})
                              for msgs, _ in derived.values() for key, value in msgs])
        if self.metrics is not None:
            for _, transitions in derived.values():
                self.metrics.observe_transitions(transitions)
        if snaps and self.producer is not None:
            # Everything the checkpointed state produced is out: the checkpoints may now count.  They are written
            # in the background (a checkpoint can be tens of MB: the next polls do not wait for it), each with
            # the watermark it was captured at (the engines have moved on with the next poll): what the
            # checkpoint lets go of in the state log is decided by its own state.
            positions = {p: ack.offset + 1 for (p, _), ack in zip(results, acks)}
            self.checkpointer.submit(self.producer, {p: (data, positions[p], max_ts, cp_wm)
                                                     for p, (data, max_ts, cp_wm) in snaps.items()},
                                     self.engines.__contains__)
        self.batches += 1
        ends: dict[int, int] = {}
        for p, out in results:
            ends[p] = out.record.end
        return {TopicPartition(t.events, p): off for p, off in ends.items()}

    # ---------------------------------------------------------------- rebalance
    async def release(self, partitions: list[int]) -> None:
        async with self._lock:
            await self.settle()  # the next owner must find our last records in the log
            await self.checkpointer.drain()  # and not see our checkpoint chunks interleaved with its own
            self._close_stores(partitions)
            for p in partitions:
                self.checkpointer.forget(p)
                self.engines.pop(p, None)
                self.offsets.pop(p, None)
                self.log_pos.pop(p, None)
            if partitions:
                log.info("released partitions %s", partitions)

    async def recover(self, partitions: list[int]) -> None:
        """Rebuild the engines of newly assigned partitions from the state log (agents/worker/recovery.py)."""
        if self.serving is not None:
            self.serving.retain([*partitions, *self.engines])  # forget partitions another worker now owns
        if not partitions:
            return
        async with self._lock:
            started = time.monotonic()
            self._close_stores([p for p in partitions if p in self.engines])  # assigned again: reopened below
            found, starts = await self.checkpointer.load(partitions)
            loaded = time.monotonic()
            rebuilt = await recovery.replay_partitions(self.cfg, self.read_log, partitions, self.serving,
                                                       stores=self._open_store, found=found, starts=starts)
            assert self.consumer is not None
            for p, rec in rebuilt.items():
                engine = rec.engine
                engine.outbox = rec.closed  # re-published below: idempotent downstream
                self.engines[p] = engine
                self.checkpointer.resume(p, rec.base, found.get(p))
                tp = TopicPartition(self.topics.events, p)
                if rec.offset is None:
                    await self.consumer.seek_to_beginning(tp)
                    self.offsets[p] = await self.consumer.position(tp)
                else:
                    self.consumer.seek(tp, rec.offset)
                    self.offsets[p] = rec.offset
                if self.serving is not None:
                    self.log_pos[p] = rec.log_end
                if rec.applied:
                    msgs, _ = self._derived(p)
                    await self._send_all([(self.topics.partials, {"key": k, "value": v, "partition": 0})
                                          for k, v in msgs])
                log.info("recovered partition %d: %d records applied, %d skipped, offset %s, %d users",
                         p, rec.applied, rec.skipped, rec.offset, engine.user_count())
            log.info("recovered %d partitions in %.2fs (checkpoints and log starts read in %.2fs)", len(partitions),
                     time.monotonic() - started, loaded - started)

    # The serving layer's view of this worker (agents/serving/writer.py LogSource).
    def owns(self, partition: int) -> bool:
        """Whether this worker currently owns ``partition`` of the input."""
        return partition in self.engines

    def read_log(self, partitions: list[int], offsets: dict[int, int] | None = None
                 ) -> AsyncIterator[tuple[int, int, Record]]:
        """Every state-log record of ``partitions`` (from ``offsets[p]`` where given), in order:
        (partition, state-log offset, Record)."""
        return recovery.read_log(self.settings.kafka.bootstrap, self.topics.state_log, partitions, offsets)

    async def replay_users(self, partition: int) -> tuple[dict[str, list], int]:
        """Every user of ``partition`` from a fresh replay of the state log (the serving layer's repair)."""
        found, starts = await self.checkpointer.load([partition])
        return await recovery.replay_users(self.cfg, self.read_log, partition, found, starts)

    def owned_engines(self) -> list[PartitionEngine]:
        return list(self.engines.values())

