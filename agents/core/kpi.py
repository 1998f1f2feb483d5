"""KPI evaluation: one KPI's value, progress, projection and result in one period.  Pure.

This module works on the per-period metrics dict of
:meth:`agents.core.metrics.PeriodMetrics.result` and on the KPI spec objects
of :mod:`config.kpis` (it only reads their attributes, so it does not import
the config layer).  It owns compiling a KPI to a formula over metric paths
(with its segment applied), the KPI's exact value, the expected progress of an
open period (optionally shaped by a profile), the linear projection of additive
KPIs, and :func:`evaluate_kpi`, which combines them with the scoring rules of
:mod:`agents.core.kpi_scoring` into a :class:`KpiResult`.  While a period is
open, the status, the multiplier and the credited attainment are computed from
the *projected* attainment; once closed, from the actual attainment.  Owner
scores live in :mod:`agents.core.owner_scores`, target suggestions in
:mod:`agents.core.kpi_targets`; the rules are documented in ``docs/kpis.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

from kpimon.agents.core.formula import PREV, Formula, parse_formula
from kpimon.agents.core.grains import Grain, Period
from kpimon.agents.core.kpi_metrics import CHANNEL_SPLIT, INPUTS, MONEY_METRICS, is_additive, lookup
from kpimon.agents.core.kpi_scoring import (
    attainment,
    exact_number,
    exact_places,
    fmt,
    is_best,
    payout,
    status_for,
    top_attainment,
)
from kpimon.agents.core.periods import Calendar

if TYPE_CHECKING:  # pragma: no cover
    from kpimon.config.kpis import Kpi

__all__ = [
    "KpiResult",
    "compile_kpi",
    "evaluate_kpi",
    "expected_progress",
    "kpi_actual",
]

def _day_weight(profile: Any, day: date) -> Fraction:
    weekday = getattr(profile, "weekday", None)
    if weekday is not None:
        return exact_number(weekday[day.weekday()], "weekday weight")
    dom = getattr(profile, "day_of_month", None) or {}
    return exact_number(dom.get(day.day, getattr(profile, "default", 1)), "day-of-month weight")


def expected_progress(period: Period, now_ms: int, calendar: Calendar, profile: Any = None) -> Fraction:
    """Share of ``period`` that should be done at ``now_ms``: 0 before it, 1 at or after its end.

    Without a profile: the elapsed share of its time.  With a profile
    (``weekday``: 7 weights Mon..Sun, or ``day_of_month``: weights by day number with
    ``default`` for the others), each local day weighs its weight, and the current day
    counts in proportion to its elapsed time.  If every day of the period weighs 0,
    the plain time share is used.
    """
    start, end = period.start_ms, period.end_ms
    if end <= start or now_ms >= end:
        return Fraction(1)
    if now_ms <= start:
        return Fraction(0)
    plain = Fraction(now_ms - start, end - start)
    if profile is None or (
        getattr(profile, "weekday", None) is None and getattr(profile, "day_of_month", None) is None
    ):
        return plain
    total = done = Fraction(0)
    ts = start
    while ts < end:
        day = calendar.period_at(ts, Grain.DAY)
        w = _day_weight(profile, date.fromisoformat(day.label))
        total += w
        if day.end_ms <= now_ms:
            done += w
        elif day.start_ms < now_ms:
            done += w * Fraction(now_ms - day.start_ms, day.end_ms - day.start_ms)
        ts = day.end_ms
    return plain if total == 0 else done / total


def _channel(kpi: Any) -> str | None:
    segment = getattr(kpi, "segment", None)
    return None if segment is None else segment.channel


@lru_cache(maxsize=1024)
def _compiled(text: str, channel: str | None) -> Formula:
    formula = parse_formula(text)
    if channel is None:
        return formula

    def segmented(name: str) -> str:
        prefix = PREV if name.startswith(PREV) else ""
        base = name[len(prefix):]
        if base not in CHANNEL_SPLIT:
            raise ValueError(f"metric {base!r} is not available per channel "
                             f"(split by channel: {', '.join(CHANNEL_SPLIT)})")
        return f"{prefix}{CHANNEL_SPLIT[base]}.{channel}"

    return formula.rename(segmented)


def compile_kpi(kpi: Any) -> Formula:
    """The KPI as a formula over metric paths, with its segment applied
    (``new_users`` with ``segment: {channel: paid_search}`` reads
    ``new_users_by_channel.paid_search``)."""
    text = kpi.metric if getattr(kpi, "metric", None) is not None else kpi.formula
    return _compiled(text, _channel(kpi))


def _linear(kpi: Any) -> bool:
    projection = getattr(kpi, "projection", None)
    if projection is not None:
        return projection == "linear"
    # prev. values and period inputs are constants for the whole period
    return compile_kpi(kpi).is_linear(is_additive, lambda name: name.startswith((PREV, f"{INPUTS}.")))


def _decimals(kpi: Any) -> int:
    decimals = getattr(kpi, "decimals", None)
    if decimals is not None:
        return decimals
    if getattr(kpi, "metric", None) is None:
        return 4
    return 2 if kpi.metric in MONEY_METRICS else 0


def kpi_actual(kpi: Any, metrics: Mapping[str, Any], prev_metrics: Mapping[str, Any] | None) -> Fraction | None:
    """The KPI's value for one period; ``None`` on division by zero or when ``prev.`` is
    needed and ``prev_metrics`` is ``None``."""

    def resolve(name: str) -> Fraction | None:
        if name.startswith(PREV):
            return None if prev_metrics is None else lookup(prev_metrics, name[len(PREV):])
        return lookup(metrics, name)

    return compile_kpi(kpi).evaluate(resolve)


@dataclass(frozen=True)
class KpiResult:
    """One KPI in one period.  Exact values; ``to_dict()`` writes fixed-decimal strings.

    ``multiplier`` and ``credited_attainment`` are final once ``closed``; while the period
    is open they are forecasts computed from ``projected_attainment``.
    """

    kpi: str
    period: str
    grain: str
    kind: str
    direction: str
    closed: bool
    actual: Fraction | None
    target: Fraction | None
    attainment: Fraction | None
    expected_progress: Fraction
    projected_value: Fraction | None
    projected_attainment: Fraction | None
    status: str
    multiplier: Fraction | None
    credited_attainment: Fraction | None
    note: str | None = None
    decimals: int = 4

    def to_dict(self) -> dict[str, Any]:
        d = self.decimals
        return {
            "kpi": self.kpi, "period": self.period, "grain": self.grain, "kind": self.kind,
            "direction": self.direction, "closed": self.closed,
            "actual": fmt(self.actual, d), "target": fmt(self.target, max(d, exact_places(self.target))),
            "attainment": fmt(self.attainment), "expected_progress": fmt(self.expected_progress),
            "projected_value": fmt(self.projected_value, d), "projected_attainment": fmt(self.projected_attainment),
            "status": self.status, "multiplier": fmt(self.multiplier),
            "credited_attainment": fmt(self.credited_attainment), "note": self.note,
        }


def evaluate_kpi(
    kpi: Kpi,
    metrics: Mapping[str, Any],
    prev_metrics: Mapping[str, Any] | None,
    period: Period,
    now_ms: int,
    calendar: Calendar,
    closed: bool,
) -> KpiResult:
    """Evaluate ``kpi`` on the metrics of ``period`` (``PeriodMetrics.result()``).

    ``prev_metrics``: the previous period of the same grain (for ``prev.``), or ``None``.
    ``closed``: the period is final; otherwise ``now_ms`` gives the expected progress.
    """
    if period.grain != kpi.grain:
        raise ValueError(f"KPI {kpi.id!r} has grain {Grain(kpi.grain).value}, "
                         f"the period {period.label} is a {Grain(period.grain).value}")
    direction = kpi.direction
    curve = getattr(kpi, "payout", None)
    actual = kpi_actual(kpi, metrics, prev_metrics)
    configured = kpi.target_for(period.label)
    target = None if configured is None else exact_number(configured, "target")
    att = attainment(actual, target, direction)
    progress = Fraction(1) if closed else expected_progress(period, now_ms, calendar, getattr(kpi, "profile", None))
    if actual is None:
        projected = None
    elif closed or not _linear(kpi):
        projected = actual
    else:
        projected = None if progress == 0 else actual / progress
    projected_att = attainment(projected, target, direction)
    best = is_best(projected, target, direction)
    note = None
    if target is None:
        status, multiplier, credited = "no_target", None, None
        note = f"no target for {period.label}"
    elif projected is None:
        status, multiplier, credited = "no_data", None, None
        note = ("no value (division by zero or no previous period)" if actual is None
                else "period has not started yet")
    else:
        basis = att if closed else projected_att
        if best:
            status = "on_track"
            note = "best: actual is 0 with direction lower, paid at the top of the curve"
        else:
            status = status_for(projected_att, getattr(kpi, "at_risk", Fraction(19, 20)),
                                getattr(kpi, "off_track", Fraction(4, 5)))
        multiplier = payout(None if best else basis, curve)
        top = top_attainment(curve)
        # Not best, so basis is not None: projected is not None and the target is > 0 (validated);
        # a target of 0 would fail in max() as before.
        credited = top if best else min(max(cast(Fraction, basis), Fraction(0)), top)
    return KpiResult(
        kpi=kpi.id, period=period.label, grain=Grain(period.grain).value, kind=getattr(kpi, "kind", "committed"),
        direction=direction, closed=closed, actual=actual, target=target, attainment=att,
        expected_progress=progress, projected_value=projected, projected_attainment=projected_att,
        status=status, multiplier=multiplier, credited_attainment=credited, note=note, decimals=_decimals(kpi),
    )
