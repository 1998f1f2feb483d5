"""N-day retention and cohort bookkeeping: known and unknown numbers, the wire, merges, the KPI catalogue.

The counts themselves are checked against the reference in test_engine_boundaries (hand-computed cases) and
test_properties (generated streams).  This covers what those cannot reach: numbers a partition cannot know
(its users' signup days were not recorded before an upgrade), numbers written before retention existed, and
the metric names a KPI spec may use.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from kpimon.agents.core.kpi_metrics import is_additive, lookup, metric_name_problem
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.config.kpi_loading import from_mapping
from kpimon.config.settings import ConfigError


def _metrics(retention: dict[int, list[int]] | None, cohorts: dict[str, int] | None = None) -> PeriodMetrics:
    m = PeriodMetrics()
    m.active_users = 1
    m.retention, m.cohorts = retention, cohorts
    return m


def test_a_merge_keeps_what_every_part_knows() -> None:
    a = _metrics({1: [4, 2], 7: [3, 1]}, {"2024-01": 5, "2024-02": 1})
    b = _metrics({1: [1, 1]}, {"2024-01": 2})  # this partition cannot know d7, nor the 2024-02 cohort
    merged = a.merge(b)
    assert merged.retention == {1: [5, 3]} and merged.cohorts == {"2024-01": 7}
    assert b.merge(a).retention == merged.retention
    # None is neutral: an accumulator without numbers of this kind
    assert _metrics(None).merge(a).retention == a.retention and a.merge(_metrics(None)).cohorts == a.cohorts
    # a day rolled into its month: the N both know, summed
    month = _metrics({1: [0, 0], 7: [1, 0]})
    month.add_additive(b)
    assert month.retention == {1: [1, 1]}


def test_numbers_written_before_retention_existed_know_none() -> None:
    wire = _metrics({1: [1, 0]}).to_wire()
    del wire["retention"], wire["cohorts"]
    old = PeriodMetrics.from_wire(wire)
    assert old.retention == {} and old.cohorts == {}
    assert old.result("sleeping", str)["retention"] == {}
    assert lookup(old.result("sleeping", str), "retention.d1.rate") is None  # no value, not 0
    assert _metrics({1: [2, 1]}).merge(old).retention == {}


@pytest.mark.parametrize("m", [_metrics(None), _metrics({}, {}), _metrics({1: [2, 1], 30: [0, 0]}, {"2024-W01": 3})])
def test_the_wire_round_trips(m: PeriodMetrics) -> None:
    again = PeriodMetrics.from_wire(m.to_wire())
    assert again.retention == m.retention and again.cohorts == m.cohorts and again == m


def test_result_and_lookup() -> None:
    result = _metrics({1: [3, 2], 7: [0, 0]}, {"2024-01": 2}).result("sleeping", str)
    assert result["retention"] == {"d1": {"eligible": 3, "retained": 2, "rate": "0.6667"},
                                   "d7": {"eligible": 0, "retained": 0, "rate": None}}
    assert result["cohorts"] == {"2024-01": 2}
    assert lookup(result, "retention.d1.retained") == 2
    assert lookup(result, "retention.d1.rate") == Fraction(6667, 10000)
    assert lookup(result, "retention.d7.rate") is None  # nobody eligible: no value
    assert lookup(result, "retention.d30.eligible") is None  # not known in this period
    assert "cohorts" not in _metrics({}).result("sleeping", str)  # a grain without cohorts


@pytest.mark.parametrize(("name", "days", "fault"), [
    ("retention.d7.rate", (1, 7, 30), None),
    ("retention.d1.eligible", None, None),
    ("prev.retention.d30.retained", (30,), None),
    ("retention.d14.rate", (1, 7, 30), "14-day retention is not computed"),
    ("retention.d7", (7,), "write retention.d<N>"),
    ("retention.7.rate", (7,), "write retention.d<N>"),
    ("retention.d7.ratio", (7,), "write retention.d<N>"),
    ("retention.d07.rate", (7,), "write retention.d<N>"),
])
def test_retention_names_in_the_kpi_catalogue(name: str, days, fault: str | None) -> None:
    got = metric_name_problem(name, retention_days=days)
    assert got is None if fault is None else fault in (got or "")


def test_counts_project_linearly_and_rates_do_not() -> None:
    assert is_additive("retention.d7.eligible") and is_additive("retention.d7.retained")
    assert not is_additive("retention.d7.rate")


def test_a_spec_naming_a_retention_the_settings_do_not_compute_is_refused() -> None:
    spec = {"kpis": [{"id": "d14", "name": "14-day retention", "grain": "month", "target": "0.2",
                      "formula": "retention.d14.retained / retention.d14.eligible"}]}
    from_mapping(spec, "kpis.yaml", retention_days=(1, 14))
    with pytest.raises(ConfigError) as err:
        from_mapping(spec, "kpis.yaml", retention_days=(1, 7, 30))
    assert "kpis.yaml: kpis.d14.formula: 'retention.d14.retained': 14-day retention is not computed" in str(err.value)


def test_first_purchases_and_activation_in_the_kpi_catalogue() -> None:
    m = _metrics({})
    m.first_purchases, m.activation = 3, {7: [4, 1]}
    result = m.result("sleeping", str)
    assert result["first_purchases"] == 3
    assert result["activation"] == {"eligible": 4, "converted": 1, "rate": "0.2500"}
    assert lookup(result, "activation.rate") == Fraction(1, 4) and lookup(result, "first_purchases") == 3
    assert is_additive("first_purchases") and is_additive("activation.converted") and not is_additive("activation.rate")
    for name in ("first_purchases", "activation.eligible", "activation.converted", "activation.rate"):
        assert metric_name_problem(name) is None
    assert "activation has eligible, converted, rate" in (metric_name_problem("activation.users") or "")


def test_first_purchases_and_activation_written_before_they_existed_are_unknown() -> None:
    wire = _metrics({1: [1, 0]}).to_wire()
    del wire["first_purchases"], wire["activation"]
    old = PeriodMetrics.from_wire(wire)
    assert old.first_purchases is None and old.activation == {}
    result = old.result("sleeping", str)
    assert result["first_purchases"] is None and result["activation"] == {"eligible": None, "converted": None,
                                                                          "rate": None}
    assert lookup(result, "first_purchases") is None and lookup(result, "activation.converted") is None
    known = _metrics({})
    known.first_purchases, known.activation = 2, {7: [1, 1]}
    assert known.merge(old).first_purchases is None and old.merge(known).activation == {}
    day = _metrics({})
    day.add_additive(old)
    assert day.first_purchases is None  # a month with a day of unknown first purchases
    assert PeriodMetrics.from_wire(old.to_wire()).first_purchases is None  # stays unknown on the wire
