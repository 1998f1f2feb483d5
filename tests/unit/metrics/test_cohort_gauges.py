"""The signup-cohort gauges (agents/metrics/cohorts.py): the latest closed periods' cohort counts from the ledger."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from kpimon.agents.core.aggregate import Aggregator
from kpimon.agents.core.ledger import Book
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.agents.core.periods import Calendar
from kpimon.agents.metrics.cohorts import CohortCollector
from kpimon.streams.topics import Progress

CAL = Calendar("UTC")
COHORTS = {"2024-01": {"2023-12": 0, "2023-11": 0, "2024-01": 10},
           "2024-02": {"2023-12": 0, "2024-01": 4, "2024-02": 8},
           "2024-03": {"2024-01": 2, "2024-02": 3, "2024-03": 6}}


def _collector(watermark: int | None, horizon: int = 2, active: bool = True) -> CollectorRegistry:
    book = Book({}, {}, calendar=CAL, warning_state="sleeping", decimals=2, config_version={})
    for label, cohorts in COHORTS.items():
        p = CAL.parse("month", label)
        m = PeriodMetrics()
        m.active_users, m.cohorts = 1, cohorts
        book.commit(book.on_closed("month", label, p.start_ms, p.end_ms, m))
    agg = Aggregator({})
    if watermark is not None:
        agg.on_progress(Progress(0, 1, watermark, {}))
    registry = CollectorRegistry()
    registry.register(CohortCollector(book, agg, CAL, horizon, lambda: active))
    return registry


def test_the_latest_closed_months_as_a_triangle() -> None:
    # Mid-April: March is the latest closed month; with horizon 2, January to March.
    registry = _collector(CAL.parse("month", "2024-04").start_ms + 5 * 86_400_000)
    get = registry.get_sample_value

    def cell(cohort: str, offset: str) -> float | None:
        return get("kpimon_cohort_active_users", {"grain": "month", "cohort": cohort, "offset": offset})

    assert [cell("2024-01", o) for o in "012"] == [10, 4, 2]
    assert [cell("2024-02", o) for o in "012"] == [8, 3, None]  # April is not closed
    assert [cell("2024-03", o) for o in "01"] == [6, None]
    assert cell("2023-12", "0") is None  # no signups: no row
    samples = [s for fam in registry.collect() for s in fam.samples]
    assert len(samples) == 6 and all(s.labels["grain"] == "month" for s in samples)  # no weeks closed


def test_offsets_are_zero_padded_to_sort_as_text() -> None:
    registry = _collector(CAL.parse("month", "2024-04").start_ms, horizon=12)
    assert registry.get_sample_value("kpimon_cohort_active_users",
                                     {"grain": "month", "cohort": "2024-01", "offset": "02"}) == 2


def test_nothing_before_a_watermark_nor_on_a_worker_that_does_not_aggregate() -> None:
    for registry in (_collector(None), _collector(CAL.parse("month", "2024-04").start_ms, active=False)):
        assert [s for fam in registry.collect() for s in fam.samples] == []
