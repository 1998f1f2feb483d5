"""Builds the faust app from settings and binds its services, agents and tables.

* ``IngestWorker`` (an ``app.service``): the batch hot path, see agents/ingest.py.
* ``aggregate`` (an agent) with three Tables: closes periods globally from the
  partitions' partials and progress (low volume: a few messages per partition
  per period), and publishes them on ``kpimon.periods``.
* ``/metrics`` (an ``app.page``): Prometheus exposition.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import faust
import mode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.core.aggregate import Aggregator
from agents.core.ledger import Book, canonical
from agents.core.metrics import PeriodMetrics
from agents.core.periods import Calendar
from agents.exporter import KpimonMetrics, StateCollector, new_registry
from agents.ingest import IngestService
from agents.live_kpis import KpiCollector, LiveKpis
from agents.snapshots import SnapshotStore
from streams.events import Decoder, Rejected
from streams import topics as wire
from streams.topics import Topics

log = logging.getLogger("kpimon.app")


def config_version(settings: Any, kpi_spec: Any) -> dict[str, str]:
    """What a snapshot was computed under: the engine settings' and the KPI spec's fingerprints."""
    from agents.core.engine import EngineConfig

    return {"settings": EngineConfig.from_settings(settings).fingerprint,
            "kpis": getattr(kpi_spec, "fingerprint", "") if kpi_spec is not None else ""}


def kpi_evaluator(kpi_spec: Any, settings: Any):  # noqa: ANN201
    """The ledger's hook: KPI results and owner scores of a closed period."""
    from agents.core.scorecard import evaluate_period

    calendar = Calendar(settings.timezone)

    def evaluate(grain: str, label: str, start: int, end: int, result: dict, prev: dict | None):  # noqa: ANN202
        return evaluate_period(kpi_spec, grain, label, start, end, result, prev, calendar)

    return evaluate


def create_app(settings: Any, registry=None, kpi_spec: Any = None) -> faust.App:  # noqa: ANN001
    topics = Topics(settings.kafka.topic_prefix, settings.worker.app_id)
    registry = registry or new_registry()
    metrics = KpimonMetrics(registry, settings.event_types, settings.channels, settings.money.decimals)
    ingest = IngestService(settings, metrics)
    registry.register(StateCollector(ingest.owned_engines, settings.money.decimals))
    session = max(2.0, settings.worker.session_timeout / 1000)
    datadir = os.path.join(tempfile.gettempdir(), "kpimon-faust")
    os.makedirs(datadir, exist_ok=True)

    app = faust.App(
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
    app.kpimon_registry = registry

    @app.service
    class IngestWorker(mode.Service):
        """Hosts the batch consumer inside the faust worker."""

        async def on_start(self) -> None:
            await ingest.start()
            self.add_future(self._run())

        async def _run(self) -> None:
            try:
                await ingest.run()
            except Exception:
                log.exception("ingest loop crashed; stopping the worker")
                await app.crash(RuntimeError("ingest loop crashed"))

        async def on_stop(self) -> None:
            await ingest.stop()

    partials_topic = app.topic(topics.partials, value_serializer="raw", key_serializer="raw", partitions=1)
    periods_topic = app.topic(topics.periods, value_serializer="raw", key_serializer="raw", partitions=1)
    partials_table = app.Table("period-partials", default=None, partitions=1)
    progress_table = app.Table("partition-progress", default=None, partitions=1)
    closed_table = app.Table("closed-periods", default=None, partitions=1)
    # Watermark notices: throttled in live mode (ticks every second), every change with the event clock.
    aggregator = Aggregator(partials_table, progress_table, closed_table,
                            notice_every_ms=60_000 if settings.worker.clock == "live" else 0)
    app.kpimon_aggregator = aggregator
    app.kpimon_periods_topic = periods_topic

    snapshots_topic = app.topic(topics.snapshots, value_serializer="raw", key_serializer="raw", partitions=1)
    late_topic = app.topic(topics.late, value_serializer="raw", key_serializer="raw", partitions=1)
    book = Book(app.Table("ledger-versions", default=None, partitions=1),
                app.Table("ledger-pending", default=None, partitions=1),
                calendar=Calendar(settings.timezone), warning_state=settings.lifecycle.warning_state,
                decimals=settings.money.decimals, config_version=config_version(settings, kpi_spec),
                evaluate=kpi_evaluator(kpi_spec, settings) if kpi_spec is not None else None)
    store = SnapshotStore(settings.redis.url, settings.redis.key_prefix) if settings.redis.enabled else None
    app.kpimon_book = book
    live = LiveKpis(kpi_spec, settings, aggregator, book) if kpi_spec is not None else None
    app.kpimon_live = live
    # Only the worker that runs the aggregation (it has seen progress) exports KPI gauges.
    registry.register(KpiCollector(lambda: live if aggregator.has_live() else None))
    app.kpimon_snapshots_topic = snapshots_topic

    async def publish(topic, key: str, value: bytes) -> None:  # noqa: ANN001
        fut = await topic.send(key=key.encode(), value=value)
        await fut  # delivered before the state that produced it is marked published

    async def publish_snapshots(snapshots: list[dict]) -> None:
        for snap in snapshots:
            raw = canonical(snap)
            await publish(snapshots_topic, f"{snap['grain']}/{snap['period']}/v{snap['version']}", raw)
            if store is not None:
                start = Calendar(settings.timezone).parse(snap["grain"], snap["period"]).start_ms / 1000
                await store.put(snap, raw, start)

    @app.agent(partials_topic)
    async def aggregate(stream):  # noqa: ANN001, ANN202
        async for raw in stream:
            msg = wire.decode_partials(raw)
            if isinstance(msg, wire.Partial):
                aggregator.on_partial(msg)
                continue
            ready = aggregator.on_progress(msg)
            for out in ready:  # closed periods (each followed by its snapshot), then the watermark notice
                if not aggregator.reportable(out):
                    continue
                key = f"{out.grain}/{out.period}" if isinstance(out, wire.ClosedPeriod) else "watermark"
                await publish(periods_topic, key, wire.json_encode(out))
                if isinstance(out, wire.ClosedPeriod):
                    tx = book.on_closed(out.grain, out.period, out.start, out.end, PeriodMetrics.from_wire(out.metrics))
                    await publish_snapshots(tx.snapshots)
                    book.commit(tx)
            aggregator.mark_published(ready)

    late_decoder = Decoder(settings.money.decimals)

    @app.agent(late_topic)
    async def restate(stream):  # noqa: ANN001, ANN202
        """Late events never change a closed period: they become restatements (new versions)."""
        async for batch in stream.take_events(1000, within=1.0):
            events = []
            for event in batch:
                try:
                    ev = late_decoder.decode(event.value)
                except Rejected:  # cannot happen for records the worker accepted as valid
                    log.warning("undecodable record on the late topic skipped")
                    continue
                if restatable(ev, dict(event.message.headers or ())):
                    events.append(ev)
            tx = book.on_late(events)
            await publish_snapshots(tx.snapshots)
            book.commit(tx)

    def restatable(ev, headers: dict) -> bool:  # noqa: ANN001
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
    async def metrics_page(web, request):  # noqa: ANN001, ANN202
        return web.bytes(generate_latest(registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/api/kpis")
    async def kpis_page(web, request):  # noqa: ANN001, ANN202
        if live is None:
            return web.json({"error": "no KPI spec configured (kpis: in kpimon.yaml)"}, status=404)
        if not aggregator.has_live():
            return web.json({"error": "this worker does not run the aggregation; ask another worker"},
                            status=503)
        return web.json(live.evaluate())

    @app.page("/healthz")
    async def health(web, request):  # noqa: ANN001, ANN202
        return web.json({"partitions": sorted(ingest.engines), "batches": ingest.batches})

    from agents.api import register_api

    register_api(app, ingest, settings)  # /api/users/{id}, /api/at-risk (bearer token)
    return app
