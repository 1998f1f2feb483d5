"""Live KPI evaluation of the open periods, for /metrics, /api/kpis and `kpimon kpis`.

The worker that runs the aggregation agent sees every partition's open periods
(partitions report them every few seconds on the partials topic) and the closed
ones (for ``prev.`` formulas); it alone exports the KPI gauges, so the series
are not double counted across workers.  Other workers export none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kpimon.agents.core.aggregate import Aggregator
from kpimon.agents.core.ledger import Book
from kpimon.agents.core.periods import Calendar
from kpimon.agents.core.scorecard import evaluate_period
from kpimon.streams.events import format_money

STATUSES = ("on_track", "at_risk", "off_track", "no_data", "no_target")


class LiveKpis:
    def __init__(self, spec: Any, settings: Any, aggregator: Aggregator, book: Book,
                 clock: Callable[[], int] | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.aggregator = aggregator
        self.book = book
        self.calendar = Calendar(settings.timezone)
        self._clock = clock

    def now_ms(self, view: dict) -> int:
        if self._clock is not None:
            return self._clock()
        if self.settings.worker.clock == "live":
            return int(time.time() * 1000)
        # Event clock: as of the global watermark (every partition has reached it).
        parts = self.aggregator.partition_count()
        return (self.aggregator.global_watermark(parts) or 0) if parts else 0

    def evaluate(self) -> dict[str, Any]:
        view = self.aggregator.live_view()
        now = self.now_ms(view)

        def money(v: int) -> str:
            return format_money(v, self.settings.money.decimals)

        kpis: list[dict] = []
        owners: list[dict] = []
        for grain, (label, start, end, metrics) in sorted(view.items()):
            result = metrics.result(self.settings.lifecycle.warning_state, money)
            k, o = evaluate_period(self.spec, grain, label, start, end, result, self.book.previous(grain, start),
                                   self.calendar, now_ms=min(max(now, start), end), closed=False)
            kpis.extend(k)
            owners.extend(o)
        return {"as_of": self.calendar.iso(now) if now else None, "kpis": kpis, "owners": owners}


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


class KpiCollector(Collector):
    """kpimon_kpi_* and kpimon_owner_* gauges; label values come from the spec (bounded)."""

    def __init__(self, live: Callable[[], LiveKpis | None]) -> None:
        self._live = live

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        live = self._live()
        data = live.evaluate() if live is not None else {"kpis": [], "owners": []}
        fams = {name: GaugeMetricFamily(f"kpimon_kpi_{name}", doc, labels=["kpi"]) for name, doc in (
            ("actual", "KPI value so far in its open period"),
            ("target", "KPI target of the open period"),
            ("attainment_ratio", "actual/target (target/actual for lower-is-better)"),
            ("projected_attainment_ratio", "attainment projected to the end of the period"),
            ("expected_progress_ratio", "share of the period elapsed (optionally shaped by a profile)"),
        )}
        status = GaugeMetricFamily("kpimon_kpi_status", "1 for the KPI's current status", labels=["kpi", "status"])
        for r in data["kpis"]:
            for name, field in (("actual", "actual"), ("target", "target"), ("attainment_ratio", "attainment"),
                                ("projected_attainment_ratio", "projected_attainment"),
                                ("expected_progress_ratio", "expected_progress")):
                v = _num(r.get(field))
                if v is not None:
                    fams[name].add_metric([r["kpi"]], v)
            for s in STATUSES:
                status.add_metric([r["kpi"], s], 1.0 if r["status"] == s else 0.0)
        score = GaugeMetricFamily("kpimon_owner_score", "Owner's weighted attainment score (open period)",
                                  labels=["owner"])
        mult = GaugeMetricFamily("kpimon_owner_multiplier", "Owner's projected bonus multiplier (open period)",
                                 labels=["owner"])
        for o in data["owners"]:
            if o["score"] is not None:
                score.add_metric([o["owner"]], float(o["score"]))
            if o["multiplier"] is not None:
                mult.add_metric([o["owner"]], float(o["multiplier"]))
        yield from fams.values()
        yield status
        yield score
        yield mult
