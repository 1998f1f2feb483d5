"""Growth accounting's bookkeeping: the quick ratio, and periods whose growth is unknown.

The counts themselves are checked against the reference in test_engine_boundaries (hand-computed cases) and
test_properties (generated streams); this covers what those cannot reach: numbers written by a version
without growth accounting (a checkpoint, a closed period in the ledger, a partial in flight).
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from kpimon.agents.core.kpi_metrics import lookup, metric_name_problem
from kpimon.agents.core.metrics import GROWTH, GROWTH_KEYS, PeriodMetrics, quick_ratio


@pytest.mark.parametrize(("gained", "dormant", "want"), [
    (0, 0, None),  # nobody dormant: the ratio has no value (not infinity, not zero)
    (5, 0, None),
    (0, 4, "0.0000"),
    (1, 2, "0.5000"),
    (2, 3, "0.6667"),
    (1, 8, "0.1250"),
    (1, 80000, "0.0000"),  # 0.0000125: rounded half-even to 4 places
    (3, 80000, "0.0000"),  # 0.0000375
    (5, 80000, "0.0001"),  # 0.0000625
    (10**12, 3, "333333333333.3333"),
])
def test_quick_ratio(gained: int, dormant: int, want: str | None) -> None:
    assert quick_ratio(gained, dormant) == want


def _metrics(**values: int) -> PeriodMetrics:
    m = PeriodMetrics()
    for k, v in values.items():
        setattr(m, k, v)
    return m


def test_growth_of_numbers_written_before_it_existed_is_unknown_not_zero() -> None:
    old = _metrics(active_users=7, first_active=1, retained=2, resurrected=4, prev_active=9).to_wire()
    for name in GROWTH:
        del old[name]
    m = PeriodMetrics.from_wire(old)
    assert not m.growth and m.active_users == 7
    assert m.result("sleeping", str)["growth"] == dict.fromkeys(GROWTH_KEYS)
    assert PeriodMetrics.from_wire(m.to_wire()).growth is False  # stays unknown on the wire
    # One partition unknown makes the merged period unknown; a known one stays known.
    known = _metrics(active_users=3, first_active=1, retained=1, resurrected=1, prev_active=5)
    assert not known.merge(m).growth and not m.merge(known).growth
    both = known.merge(known)
    assert both.growth and both.result("sleeping", str)["growth"] == {
        "new": 2, "retained": 2, "resurrected": 2, "dormant": 8, "quick_ratio": "0.5000"}
    # A KPI formula reading an unknown number has no value; a known one is exact.
    result = m.result("sleeping", str)
    assert lookup(result, "growth.dormant") is None and lookup(result, "active_users") == 7
    assert lookup(both.result("sleeping", str), "growth.quick_ratio") == Fraction(1, 2)


def test_growth_names_are_in_the_kpi_catalogue() -> None:
    for key in GROWTH_KEYS:
        assert metric_name_problem(f"growth.{key}") is None
        assert metric_name_problem(f"prev.growth.{key}") is None
    assert "growth" in (metric_name_problem("growth.lost") or "")
