"""The signup-cohort gauges: the cohort table of the latest closed weeks and months, for a Grafana heatmap.

Exported by the worker that runs the aggregation (as the KPI gauges), read at scrape time from the ledger:
for each cohort grain, the latest closed period and the ``retention.cohort_horizon`` before it, each with
its cohort counts (``PeriodMetrics.cohorts``).  ``kpimon_cohort_active_users{grain, cohort, offset}`` is the
cohort's users active ``offset`` periods after its own (offset 0: the cohort's size).  Label values are
period labels and zero-padded offsets (they sort as text in Grafana): at most (horizon + 1)^2 series per
grain, no user data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kpimon.agents.core.aggregate import Aggregator
from kpimon.agents.core.cohorts import COHORT_GRAINS, cohort_table
from kpimon.agents.core.ledger import Book
from kpimon.agents.core.periods import Calendar


class CohortCollector(Collector):
    def __init__(self, book: Book, aggregator: Aggregator, calendar: Calendar, horizon: int,
                 active: Callable[[], bool]) -> None:
        self.book, self.aggregator, self.calendar, self.horizon = book, aggregator, calendar, horizon
        self._active = active

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        fam = GaugeMetricFamily("kpimon_cohort_active_users",
                                "Users of a signup cohort active in the period <offset> periods after its own "
                                "(latest closed weeks and months; offset 0: the cohort's size)",
                                labels=["grain", "cohort", "offset"])
        parts = self.aggregator.partition_count() if self._active() else 0
        wm = self.aggregator.global_watermark(parts) if parts else None
        if wm is not None:
            width = len(str(self.horizon))
            for grain in COHORT_GRAINS:
                start = self.calendar.period_at(wm, grain).start_ms  # the open period
                periods = []
                for _ in range(self.horizon + 1):
                    prev = self.calendar.period_at(start - 1, grain)
                    result = self.book.previous(grain, start)
                    if result is None:
                        break
                    periods.append((prev.label, result))
                    start = prev.start_ms
                for row in cohort_table(periods, grain):
                    for offset, n in enumerate(row.active):
                        if n is not None:
                            fam.add_metric([grain.value, row.cohort, str(offset).zfill(width)], n)
        yield fam
