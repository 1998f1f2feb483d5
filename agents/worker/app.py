"""Builds the faust app from settings and binds its services, agents and tables.

* ``IngestWorker`` (an ``app.service``): the batch hot path, see agents/worker/ingest.py.
* ``aggregate`` (an agent) with three Tables: closes periods globally from the
  partitions' partials and progress (low volume: a few messages per partition
  per period), and publishes them on ``kpimon.periods``.
* ``/metrics`` (an ``app.page``): Prometheus exposition.
* ``/healthz``: 503 while a loop is down (agents/worker/health.py).

A failure that escapes the ingest loop, an agent or faust itself marks the
loop down, counts it, and stops the worker: ``kpimon worker`` then exits with
code 1 so that a supervisor restarts it (docs/operations.md#exit-codes-and-healthz).
The loops are not restarted in-process: the ingest engines may hold a batch the
state log does not, and faust would restart an agent past the record it failed
on.  A restarted process rebuilds both from the state log and the changelogs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import faust
import mode
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kpimon.agents.core.aggregate import Aggregator, Prefixed
from kpimon.agents.core.ledger import Book, canonical
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.agents.core.periods import Calendar
from kpimon.agents.core.step import close_step
from kpimon.agents.metrics.cohorts import CohortCollector
from kpimon.agents.metrics.exporter import KpimonMetrics, StateCollector, new_registry
from kpimon.agents.metrics.live_kpis import KpiCollector, LiveKpis
from kpimon.agents.serving.snapshots import SnapshotStore
from kpimon.agents.worker import instance as worker_instance
from kpimon.agents.worker.health import Health
from kpimon.agents.worker.ingest import IngestService
from kpimon.agents.worker.inorder import Cursor
from kpimon.errors import KpimonError
from kpimon.streams import topics as wire
from kpimon.streams.events import Decoder, Rejected
from kpimon.streams.topics import Topics

log = logging.getLogger("kpimon.app")


def config_version(settings: Any, kpi_spec: Any) -> dict[str, str]:
    """What a snapshot was computed under: the engine settings' and the KPI spec's fingerprints."""
    from kpimon.agents.core.engine import EngineConfig

    return {"settings": EngineConfig.from_settings(settings).fingerprint,
            "kpis": getattr(kpi_spec, "fingerprint", "") if kpi_spec is not None else ""}


def kpi_evaluator(kpi_spec: Any, settings: Any):
    """The ledger's hook: KPI results and owner scores of a closed period."""
    from kpimon.agents.core.scorecard import evaluate_period

    calendar = Calendar(settings.timezone)

    def evaluate(grain: str, label: str, start: int, end: int, result: dict, prev: dict | None):
        return evaluate_period(kpi_spec, grain, label, start, end, result, prev, calendar)

    return evaluate


class UndecodableRecord(KpimonError):
    """A record on an internal topic that this kpimon cannot decode (another version, or not kpimon's)."""


class LedgerTable(faust.Table):
    """A one-partition Table that can be written outside a stream's iteration.

    ``restate`` commits after a batch of late events was taken (``take_events``
    with ``within``): faust's current event is gone then, and a plain Table
    raises ``TypeError: Cannot modify table key from outside of stream
    iteration`` because it takes the changelog partition from that event.
    With one partition it is always 0.  (The partition counts are verified
    before the worker starts: agents/cli/pipeline.py, streams/admin.py.)
    """

    def partition_for_key(self, key: Any) -> int:
        return 0


if TYPE_CHECKING:

    class KpimonApp(faust.App):
        """The faust app with what :func:`create_app` binds on it, for the CLI, the tests and the type checker."""

        kpimon_settings: Any
        kpimon_ingest: IngestService
        kpimon_instance: worker_instance.Instance | None
        kpimon_registry: CollectorRegistry
        kpimon_health: Health
        kpimon_on_fatal: Callable[[BaseException], None] | None
        kpimon_fail: Callable[[str, BaseException], Awaitable[None]]
        kpimon_aggregator: Aggregator
        kpimon_periods_topic: faust.types.TopicT
        kpimon_book: Book
        kpimon_live: LiveKpis | None
        kpimon_snapshots_topic: faust.types.TopicT
        kpimon_restate_agent: faust.types.AgentT
        kpimon_aggregate_agent: faust.types.AgentT
        kpimon_cursors: tuple[Cursor, Cursor]
else:
    # At run time the app stays a plain faust.App: a subclass would change the class-derived
    # names faust and mode log under (the service label, the "faust.app.base" logger).
    KpimonApp = faust.App


def internal_topics(app: faust.App) -> dict[str, tuple[int, dict[str, str]]]:
    """faust's changelog topics of the app's Tables: partition count and configs, as faust declares them."""
    return {table.changelog_topic.get_topic_name(): (table.partitions or 1, {"cleanup.policy": "compact"})
            for table in app.tables.values()}


def create_app(settings: Any, registry: CollectorRegistry | None = None, kpi_spec: Any = None) -> KpimonApp:
    topics = Topics(settings.kafka.topic_prefix, settings.worker.app_id)
    registry = registry or new_registry()
    metrics = KpimonMetrics(registry, settings.event_types, settings.channels, settings.money.decimals)
    # Static group membership of the ingest consumer group (agents/worker/instance.py): a restarted worker
    # takes its partitions back at once.  The slot's lock lives as long as the process.  Not for the faust
    # app's group: a static member rejoining gets the assignment the leader computed from its previous
    # metadata, and faust's assignor refuses one whose web URL differs (a new web_port) and stops the worker.
    instance = worker_instance.for_settings(settings)
    instance_id = instance.id if instance is not None else None
    ingest = IngestService(settings, metrics, instance_id=instance_id)
    registry.register(StateCollector(ingest.owned_engines, settings.money.decimals))
    session = max(2.0, settings.worker.session_timeout / 1000)
    datadir = os.path.join(tempfile.gettempdir(), "kpimon-faust")
    os.makedirs(datadir, exist_ok=True)

    app = KpimonApp(
        f"{settings.kafka.topic_prefix}{settings.worker.app_id}-agg",
        broker=settings.kafka.broker,
        store="memory://",
        autodiscover=False,
        topic_replication_factor=1,
        topic_partitions=1,
        web_enabled=True,
        web_host=settings.worker.web_host,
        web_bind=settings.worker.web_host,
        web_port=settings.worker.web_port,
        broker_session_timeout=session,
        broker_heartbeat_interval=max(0.3, session / 4),
        broker_rebalance_timeout=max(2.0, session),
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=16 * 1024 * 1024,
        web_in_thread=False,
        web_tables_enabled=False,  # faust's /table pages would expose late events with user ids
        # faust keeps only small bookkeeping here (tables use the memory store)
        datadir=os.path.join(datadir, "{conf.name}-data"),
    )
    app.kpimon_settings = settings
    app.kpimon_ingest = ingest
    app.kpimon_instance = instance
    app.kpimon_registry = registry
    health = Health(registry)
    app.kpimon_health = health
    # How a loop's failure stops the process: `kpimon worker` sets this (agents/cli/pipeline.py) to stop the
    # faust Worker with exit code 1.  Without it (tests, embedding) the faust app is crashed.
    app.kpimon_on_fatal = None

    async def fail(loop: str, exc: BaseException) -> None:
        first = health.ok
        reason = health.crashed(loop, exc)
        log.error("%s loop crashed; stopping the worker (exit code 1): %s", loop, reason, exc_info=exc)
        if not first:
            return  # already stopping
        if app.kpimon_on_fatal is not None:
            app.kpimon_on_fatal(exc)
        else:
            await app.crash(exc)

    app.kpimon_fail = fail

    class IngestWorker(mode.Service):
        """Hosts the batch consumer inside the faust worker.

        A dependency of the app itself, not an ``app.service``: faust starts those only once its own
        group has joined and its Tables are recovered, which after a crash waits out the dead process's
        session (the faust group is dynamic, see agents/worker/instance.py).  Ingest has its own clients
        and a static member id, so it starts with the app and processes while faust still waits.
        """

        async def on_start(self) -> None:
            await ingest.start()
            self.add_future(self._run())

        async def _run(self) -> None:
            try:
                await ingest.run()
            except Exception as exc:  # noqa: BLE001 - any failure stops the worker
                await fail("ingest", exc)

        async def on_stop(self) -> None:
            await ingest.stop()

    app.add_dependency(IngestWorker(beacon=app.beacon))  # started with the app, before its own children

    @app.service
    class CrashWatch(mode.Service):
        """faust marks its app crashed (e.g. a table recovery failure) but keeps the process running."""

        async def on_start(self) -> None:
            self.add_future(self._watch())

        async def _watch(self) -> None:
            while True:
                await asyncio.sleep(1.0)
                if app.crashed and health.ok:
                    await fail("faust", app.crash_reason or RuntimeError("the faust app crashed"))

    def supervised(loop: str):
        """An agent body whose failure stops the worker instead of faust restarting it past the record."""

        def wrap(fun):
            @functools.wraps(fun)
            async def body(stream):
                try:
                    await fun(stream)
                except Exception as exc:  # noqa: BLE001 - any failure of an agent body stops the worker
                    await fail(loop, exc)
                    await asyncio.Event().wait()  # hold the failed record (not acknowledged) until the stop
            return body

        return wrap

    partials_topic = app.topic(topics.partials, value_serializer="raw", key_serializer="raw", partitions=1)
    periods_topic = app.topic(topics.periods, value_serializer="raw", key_serializer="raw", partitions=1)
    def ledger_table(name: str) -> LedgerTable:  # as app.Table does it, with our class
        table = LedgerTable(app, name=name, default=None, beacon=app.tables.beacon, partitions=1)
        app.tables.add(table)
        return table

    # The aggregation and the ledger write all their state to this one Table: one changelog, so a crash
    # leaves a prefix of their writes in processing order (agents/core/aggregate.py).  The other Tables hold
    # what earlier versions wrote there, and are only read.
    state_table = ledger_table("period-partials")
    progress_table = app.Table("partition-progress", default=None, partitions=1)
    closed_table = app.Table("closed-periods", default=None, partitions=1)
    # Watermark notices: throttled in live mode (ticks every second), every change with the event clock.
    aggregator = Aggregator(state_table, progress_table, closed_table,
                            notice_every_ms=60_000 if settings.worker.clock == "live" else 0)
    app.kpimon_aggregator = aggregator
    app.kpimon_periods_topic = periods_topic

    snapshots_topic = app.topic(topics.snapshots, value_serializer="raw", key_serializer="raw", partitions=1)
    late_topic = app.topic(topics.late, value_serializer="raw", key_serializer="raw", partitions=1)
    book = Book(Prefixed(state_table, "ledger/", legacy=ledger_table("ledger-versions")),
                Prefixed(state_table, "pending/", legacy=ledger_table("ledger-pending")),
                calendar=Calendar(settings.timezone), warning_state=settings.lifecycle.warning_state,
                decimals=settings.money.decimals, config_version=config_version(settings, kpi_spec),
                evaluate=kpi_evaluator(kpi_spec, settings) if kpi_spec is not None else None)
    store = SnapshotStore(settings.redis.url, settings.redis.key_prefix) if settings.redis.enabled else None
    app.kpimon_book = book
    live = LiveKpis(kpi_spec, settings, aggregator, book) if kpi_spec is not None else None
    app.kpimon_live = live
    # Only the worker that runs the aggregation (it has seen progress) exports KPI gauges.
    registry.register(KpiCollector(lambda: live if aggregator.has_live() else None))
    registry.register(CohortCollector(book, aggregator, Calendar(settings.timezone), settings.retention.cohort_horizon,
                                      aggregator.has_live))
    app.kpimon_snapshots_topic = snapshots_topic

    async def publish(topic, key: str, value: bytes) -> None:
        fut = await topic.send(key=key.encode(), value=value)
        await fut  # delivered before the state that produced it is marked published

    async def publish_snapshots(snapshots: list[dict]) -> None:
        for snap in snapshots:
            raw = canonical(snap)
            await publish(snapshots_topic, f"{snap['grain']}/{snap['period']}/v{snap['version']}", raw)
            if store is not None:
                start = Calendar(settings.timezone).parse(snap["grain"], snap["period"]).start_ms / 1000
                await store.put(snap, raw, start)

    # The next offset of each input to apply, kept in the agents' state (agents/worker/inorder.py).
    partials_at = Cursor(state_table, "partials", topics.partials, settings.kafka.bootstrap)
    late_at = Cursor(state_table, "late", topics.late, settings.kafka.bootstrap)
    app.kpimon_cursors = (partials_at, late_at)

    async def aggregate_one(raw: bytes, where: str) -> None:
        try:
            msg = wire.decode_partials(raw)
        except (msgspec.DecodeError, TypeError) as err:
            raise UndecodableRecord(f"undecodable record {where}: {err}") from None
        step = close_step(aggregator, msg)
        for out in step.publish:  # closed periods (each followed by its snapshot), then the watermark notice
            key = f"{out.grain}/{out.period}" if isinstance(out, wire.ClosedPeriod) else "watermark"
            await publish(periods_topic, key, wire.json_encode(out))
            if isinstance(out, wire.ClosedPeriod):
                tx = book.on_closed(out.grain, out.period, out.start, out.end, PeriodMetrics.from_wire(out.metrics))
                await publish_snapshots(tx.snapshots)
                book.commit(tx)
        aggregator.mark_published(step.mark)

    @app.agent(partials_topic)
    @supervised("aggregate")
    async def aggregate(stream):
        async for raw in stream:
            record = (stream.current_event.message.offset, raw, None)
            async for offset, value, _ in partials_at.through(await partials_at.next(), record):
                await aggregate_one(value, f"at {topics.partials}[0]@{offset}")
                partials_at.set(offset + 1)

    late_decoder = Decoder(settings.money.decimals, min_epoch_ms=settings.min_epoch_ms)

    @app.agent(late_topic)
    @supervised("restate")
    async def restate(stream):
        """Late events never change a closed period: they become restatements (new versions)."""
        async for batch in stream.take_events(1000, within=1.0):
            expected = start = await late_at.next()
            events: list = []
            for event in batch:
                record = (event.message.offset, event.value, event.message.headers)
                async for offset, value, headers in late_at.through(expected, record):
                    take_late(value, headers, events)
                    expected = offset + 1
            if expected == start:
                continue
            tx = book.on_late(events)
            await publish_snapshots(tx.snapshots)
            book.commit(tx)
            late_at.set(expected)

    def take_late(value: bytes, headers: Any, events: list) -> None:
        """Add the late event to ``events`` if it may be restated."""
        try:
            ev = late_decoder.decode(value)
        except Rejected:  # cannot happen for records the worker accepted as valid
            log.warning("undecodable record on the late topic skipped")
            return
        if restatable(ev, dict(headers or ())):
            events.append(ev)

    def restatable(ev, headers: dict) -> bool:
        """A late event older than the dedup horizon may be a retry of an event counted long ago
        (its id left the dedup set): it cannot be told apart, so it is not restated."""
        try:
            wm = int(headers.get(wire.H_WATERMARK, b""))
        except ValueError:
            return False
        return ev.ts >= wm - settings.dedup_horizon

    app.kpimon_restate_agent = restate

    app.kpimon_aggregate_agent = aggregate

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.bytes(generate_latest(registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/api/kpis")
    async def kpis_page(web, request):
        if live is None:
            return web.json({"error": "no KPI spec configured (kpis: in kpimon.yaml)"}, status=404)
        if not aggregator.has_live():
            return web.json({"error": "this worker does not run the aggregation; ask another worker"},
                            status=503)
        return web.json(live.evaluate())

    @app.page("/healthz")
    async def healthz(web, request):
        status, body = health.status(partitions=sorted(ingest.engines), batches=ingest.batches)
        return web.json(body, status=status)

    from kpimon.agents.http.api import register_api

    register_api(app, ingest, settings)  # /api/users/{id}, /api/at-risk (bearer token)
    return app
