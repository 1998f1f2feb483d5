"""KPI evaluation, payout curves, owner scores and target suggestions.  Pure.

This module works on the per-period metrics dict of
:meth:`agents.core.metrics.PeriodMetrics.result` and on the KPI spec objects
of :mod:`config.kpis` (it only reads their attributes, so it does not import
the config layer).  All arithmetic is exact (:class:`fractions.Fraction`);
rounding happens only when a value is written out (:func:`fmt`,
``to_dict()``), half to even, with a fixed number of decimals.

The rules are documented in ``docs/kpis.md``.  In short:

* attainment = actual / target (``direction: higher``) or target / actual
  (``lower``); a ``lower`` KPI whose actual is 0 (or below) is the best possible
  outcome: attainment ``None``, note ``best``, multiplier = top of the curve;
* payout: piecewise linear through the curve's points, ``floor`` below the
  first point, flat after the last one, clamped to ``[floor, cap]``;
* owner multiplier = sum over committed KPIs of weight' x multiplier (weights
  renormalised over the committed KPIs that have a value) + sum over stretch
  KPIs of weight x max(0, multiplier - 1): a stretch KPI can only add;
* owner score = the same rule applied to the *credited* attainment (attainment
  clipped to ``[0, last curve point]``) instead of the multiplier;
* while a period is open, the status, the multiplier and the credited
  attainment are computed from the *projected* attainment; once closed, from
  the actual attainment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from kpimon.agents.core.formula import PREV, Formula, parse_formula, to_fraction
from kpimon.agents.core.lifecycle import STATES
from kpimon.agents.core.periods import Calendar, Grain, Period

if TYPE_CHECKING:  # pragma: no cover
    from kpimon.config.kpis import Kpi, Owner

__all__ = [
    "ADDITIVE_METRICS",
    "DEFAULT_CURVE",
    "MONEY_METRICS",
    "SCALAR_METRICS",
    "STATUSES",
    "Contribution",
    "Curve",
    "KpiResult",
    "OwnerScore",
    "TargetSuggestion",
    "attainment",
    "compile_kpi",
    "evaluate_kpi",
    "exact_number",
    "expected_progress",
    "fmt",
    "kpi_actual",
    "lookup",
    "metric_name_problem",
    "payout",
    "score_owner",
    "status_for",
    "suggest_target",
]

# --------------------------------------------------------------------------- metric catalogue

#: Top-level numbers of ``PeriodMetrics.result()``.
SCALAR_METRICS: tuple[str, ...] = (
    "new_users", "active_users", "orders", "paying_users", "revenue", "refunds", "invites",
    "referred_signups", "entered_silent", "entered_sleeping", "entered_churned", "entered_dead",
    "churn_warnings", "churned", "won_back",
)
#: Nested numbers: ``<group>.<key>``.
NESTED_METRICS: dict[str, tuple[str, ...]] = {
    "population": tuple(STATES),
    "won_back_by_depth": ("churned", "dead"),
}
#: Metrics that are split by acquisition channel, and where the split lives.
CHANNEL_SPLIT: dict[str, str] = {"new_users": "new_users_by_channel"}
#: Flows that add up over time (a month is the sum of its days): projected linearly.
ADDITIVE_METRICS: frozenset[str] = frozenset({
    "new_users", "orders", "revenue", "refunds", "invites", "referred_signups", "entered_silent",
    "entered_sleeping", "entered_churned", "entered_dead", "churn_warnings", "churned", "won_back",
    "won_back_by_depth.churned", "won_back_by_depth.dead",
})
#: Money amounts (decimal strings in the metrics dict).
MONEY_METRICS: frozenset[str] = frozenset({"revenue", "refunds"})
RESERVED_CHANNELS = ("other", "unknown")

STATUSES = ("on_track", "at_risk", "off_track", "no_data", "no_target")
Direction = Literal["higher", "lower"]


def _metric_list() -> str:
    nested = [f"{g}.<{'|'.join(keys)}>" for g, keys in NESTED_METRICS.items()]
    split = [f"{v}.<channel>" for v in CHANNEL_SPLIT.values()]
    return ", ".join([*SCALAR_METRICS, *nested, *split])


def metric_name_problem(name: str, channels: Sequence[str] | None = None, *, allow_prev: bool = True) -> str | None:
    """``None`` if ``name`` is a known metric path (optionally ``prev.``-prefixed), else the fault.

    ``channels``: the allowed channel labels (``Settings.channels``); ``other`` and
    ``unknown`` are always allowed.  ``None`` accepts any channel label.
    """
    path = name
    if path.startswith(PREV):
        if not allow_prev:
            return f"{name!r}: prev. is only allowed in a formula"
        path = path[len(PREV):]
        if path.startswith(PREV):
            return f"{name!r}: prev. can only be used once"
    if path in SCALAR_METRICS:
        return None
    group, _, key = path.partition(".")
    if group in NESTED_METRICS and key:
        if key in NESTED_METRICS[group]:
            return None
        return f"unknown metric {name!r}: {group} has {', '.join(NESTED_METRICS[group])}"
    if group in CHANNEL_SPLIT.values() and key:
        if "." in key:
            return f"unknown metric {name!r}"
        if channels is not None and key not in channels and key not in RESERVED_CHANNELS:
            return f"unknown channel {key!r} in {name!r} (channels: {', '.join([*channels, *RESERVED_CHANNELS])})"
        return None
    return f"unknown metric {name!r} (metrics: {_metric_list()})"


def _is_additive(name: str) -> bool:
    if name.startswith(PREV):
        return False
    return name in ADDITIVE_METRICS or name.split(".", 1)[0] in CHANNEL_SPLIT.values()


def lookup(metrics: Mapping[str, Any], path: str) -> Fraction:
    """The exact value of a metric path in a ``PeriodMetrics.result()`` dict.

    A channel missing from ``new_users_by_channel`` is 0 (the report omits zeros).
    A missing key elsewhere raises ``KeyError`` naming the path.
    """
    group, _, key = path.partition(".")
    if key and group in CHANNEL_SPLIT.values():
        value = metrics.get(group, {}).get(key, 0)
    else:
        try:
            value = metrics[group]
            if key:
                value = value[key]
        except (KeyError, TypeError):
            raise KeyError(f"metric {path!r} is missing from the metrics dict") from None
    return to_fraction(value, path)


# --------------------------------------------------------------------------- numbers


def exact_number(value: Any, what: str = "value") -> Fraction:
    """Like :func:`to_fraction`, but a float is read as the decimal it prints as
    (``0.1`` -> 1/10): for numbers typed by people (YAML, arguments)."""
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{what}: {value!r} is not finite")
        return Fraction(Decimal(repr(value)))
    return to_fraction(value, what)


@overload
def fmt(value: None, places: int = 4) -> None: ...
@overload
def fmt(value: Fraction | Decimal | int, places: int = 4) -> str: ...
@overload
def fmt(value: Fraction | Decimal | int | None, places: int = 4) -> str | None: ...
def fmt(value: Fraction | Decimal | int | None, places: int = 4) -> str | None:
    """Exact value -> decimal string with exactly ``places`` decimals, half to even."""
    if value is None:
        return None
    n = round(Fraction(value) * 10**places)  # Fraction.__round__: half to even
    sign = "-" if n < 0 else ""
    digits = str(abs(n))
    if places == 0:
        return sign + digits
    digits = digits.rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


# --------------------------------------------------------------------------- payout curve


@dataclass(frozen=True)
class Curve:
    """Piecewise-linear payout curve: ``points`` ((attainment, multiplier), ...)
    with strictly increasing attainment; ``floor`` below the first point; flat
    after the last point; the result is clamped to ``[floor, cap]``."""

    points: tuple[tuple[Fraction, Fraction], ...]
    floor: Fraction = Fraction(0)
    cap: Fraction = Fraction(3, 2)


DEFAULT_CURVE = Curve(
    points=((Fraction(4, 5), Fraction(1, 2)), (Fraction(1), Fraction(1)), (Fraction(6, 5), Fraction(3, 2))),
    floor=Fraction(0),
    cap=Fraction(3, 2),
)


def _curve(curve: Any) -> tuple[list[tuple[Fraction, Fraction]], Fraction, Fraction]:
    curve = DEFAULT_CURVE if curve is None else curve
    pts = [(exact_number(x, "payout point"), exact_number(y, "payout point")) for x, y in curve.points]
    return pts, exact_number(curve.floor, "payout floor"), exact_number(curve.cap, "payout cap")


def payout(attainment: Fraction | Decimal | int | str | None, curve: Any = None) -> Fraction:
    """Multiplier for ``attainment`` (a ratio: 1 = 100 %) on ``curve`` (default: :data:`DEFAULT_CURVE`).

    ``None`` means "best possible" (a ``lower`` KPI at 0) and pays the top of the curve.
    """
    pts, floor, cap = _curve(curve)
    if attainment is None:
        y = pts[-1][1]
    else:
        a = exact_number(attainment, "attainment")
        if a < pts[0][0]:
            y = floor
        elif a >= pts[-1][0]:
            y = pts[-1][1]
        else:
            y = pts[0][1]
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                if x0 <= a < x1:
                    y = y0 + (y1 - y0) * (a - x0) / (x1 - x0)
                    break
    return min(max(y, floor), cap)


def _top_attainment(curve: Any) -> Fraction:
    return _curve(curve)[0][-1][0]


# --------------------------------------------------------------------------- attainment, progress, status


def attainment(actual: Fraction | None, target: Fraction | None, direction: Direction) -> Fraction | None:
    """actual/target (higher) or target/actual (lower).  ``None`` when there is no value or no
    target, and for a ``lower`` KPI whose actual is <= 0 (the best case, see :func:`payout`)."""
    if actual is None or target is None or target == 0:
        return None
    if direction == "lower":
        return None if actual <= 0 else target / actual
    return actual / target


def _best(actual: Fraction | None, target: Fraction | None, direction: str) -> bool:
    return direction == "lower" and actual is not None and target is not None and target != 0 and actual <= 0


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


def status_for(projected: Fraction | None, at_risk: Any = Fraction(19, 20), off_track: Any = Fraction(4, 5)) -> str:
    """on_track if projected >= at_risk, at_risk if >= off_track, else off_track; no_data if None."""
    if projected is None:
        return "no_data"
    if projected >= exact_number(at_risk, "at_risk"):
        return "on_track"
    if projected >= exact_number(off_track, "off_track"):
        return "at_risk"
    return "off_track"


# --------------------------------------------------------------------------- KPI values


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
    return compile_kpi(kpi).is_linear(_is_additive, lambda name: name.startswith(PREV))


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
            "actual": fmt(self.actual, d), "target": fmt(self.target, max(d, _places(self.target))),
            "attainment": fmt(self.attainment), "expected_progress": fmt(self.expected_progress),
            "projected_value": fmt(self.projected_value, d), "projected_attainment": fmt(self.projected_attainment),
            "status": self.status, "multiplier": fmt(self.multiplier),
            "credited_attainment": fmt(self.credited_attainment), "note": self.note,
        }


def _places(value: Fraction | None) -> int:
    """Decimals needed to write ``value`` exactly (at most 4 beyond the integer)."""
    if value is None:
        return 0
    for places in range(5):
        if (value * 10**places).denominator == 1:
            return places
    return 4


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
    best = _best(projected, target, direction)
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
        top = _top_attainment(curve)
        # Not best, so basis is not None: projected is not None and the target is > 0 (validated);
        # a target of 0 would fail in max() as before.
        credited = top if best else min(max(cast(Fraction, basis), Fraction(0)), top)
    return KpiResult(
        kpi=kpi.id, period=period.label, grain=Grain(period.grain).value, kind=getattr(kpi, "kind", "committed"),
        direction=direction, closed=closed, actual=actual, target=target, attainment=att,
        expected_progress=progress, projected_value=projected, projected_attainment=projected_att,
        status=status, multiplier=multiplier, credited_attainment=credited, note=note, decimals=_decimals(kpi),
    )


# --------------------------------------------------------------------------- owner scores


@dataclass(frozen=True)
class Contribution:
    kpi: str
    kind: str
    weight: Fraction              # as configured
    effective_weight: Fraction    # committed: renormalised over the committed KPIs with a value
    attainment: Fraction | None   # credited attainment (clipped to [0, last curve point])
    multiplier: Fraction | None
    contribution: Fraction        # to the owner multiplier
    status: str
    counted: bool                 # False: no value or no target, left out

    def to_dict(self) -> dict[str, Any]:
        return {"kpi": self.kpi, "kind": self.kind, "weight": fmt(self.weight),
                "effective_weight": fmt(self.effective_weight), "attainment": fmt(self.attainment),
                "multiplier": fmt(self.multiplier), "contribution": fmt(self.contribution),
                "status": self.status, "counted": self.counted}


@dataclass(frozen=True)
class OwnerScore:
    """``multiplier``: the payout multiplier (bonus = target bonus x multiplier).
    ``score``: weighted credited attainment, same weighting rule.  Both ``None`` when no
    committed KPI of the owner has a value (the owner cannot be scored for the period)."""

    owner: str
    score: Fraction | None
    multiplier: Fraction | None
    committed: Fraction | None
    stretch_bonus: Fraction
    contributions: tuple[Contribution, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "score": fmt(self.score), "multiplier": fmt(self.multiplier),
                "committed": fmt(self.committed), "stretch_bonus": fmt(self.stretch_bonus),
                "contributions": [c.to_dict() for c in self.contributions]}


def score_owner(owner: Owner, results: Mapping[str, KpiResult]) -> OwnerScore:
    """Combine the owner's KPI results (``results[kpi_id]``) by their weights.

    Committed KPIs: weight renormalised over the committed KPIs that have a value,
    contribution = weight' x multiplier.  Stretch KPIs: contribution =
    weight x max(0, multiplier - 1), so they can only add.  KPIs without a value or
    target (status no_data / no_target) are left out.
    """
    holdings = [(h.kpi, exact_number(h.weight, "weight")) for h in owner.kpis]
    missing = [k for k, _ in holdings if k not in results]
    if missing:
        raise KeyError(f"owner {owner.id!r}: no result for KPI(s) {', '.join(missing)}")
    counted = {k: results[k].multiplier is not None for k, _ in holdings}
    committed_weight = sum((w for k, w in holdings if results[k].kind != "stretch" and counted[k]), Fraction(0))
    contributions: list[Contribution] = []
    committed = stretch = score_c = score_s = Fraction(0)
    for kpi_id, weight in holdings:
        r = results[kpi_id]
        m = r.multiplier  # `m is not None` is counted[kpi_id]
        # A counted result has a credited attainment too (evaluate_kpi sets both or neither).
        if r.kind == "stretch":
            eff = weight
            contrib = weight * max(Fraction(0), m - 1) if m is not None else Fraction(0)
            stretch += contrib
            if m is not None:
                score_s += weight * max(Fraction(0), cast(Fraction, r.credited_attainment) - 1)
        else:
            eff = weight / committed_weight if m is not None else Fraction(0)
            contrib = eff * m if m is not None else Fraction(0)
            committed += contrib
            if m is not None:
                score_c += eff * cast(Fraction, r.credited_attainment)
        contributions.append(Contribution(kpi_id, r.kind, weight, eff, r.credited_attainment, r.multiplier,
                                          contrib, r.status, counted[kpi_id]))
    if committed_weight == 0:
        return OwnerScore(owner.id, None, None, None, stretch, tuple(contributions))
    return OwnerScore(owner.id, score_c + score_s, committed + stretch, committed, stretch, tuple(contributions))


# --------------------------------------------------------------------------- target suggestion


@dataclass(frozen=True)
class TargetSuggestion:
    value: Decimal          # the suggested target, rounded to ``decimals`` (half to even)
    exact: Fraction         # before rounding
    mean: Fraction          # mean of the periods used
    periods_used: int
    yaml: str               # a snippet to paste into config/kpis.yaml


def _input_places(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 0
    if isinstance(value, (str, float)):
        text = value.strip() if isinstance(value, str) else repr(value)
        exp = Decimal(text).as_tuple().exponent
        return min(max(-exp, 0), 4) if isinstance(exp, int) else 4
    if isinstance(value, Decimal):
        exp = value.as_tuple().exponent
        return min(max(-exp, 0), 4) if isinstance(exp, int) else 4
    return _places(Fraction(value))


def suggest_target(
    history: Sequence[Any],
    n: int = 3,
    haircut: Any = Fraction(1, 10),
    seasonal_reference: Any = None,
    direction: Direction = "higher",
    *,
    label: str | None = None,
    kpi_id: str | None = None,
    decimals: int | None = None,
) -> TargetSuggestion:
    """Suggest a target from closed-period actuals (oldest first).

    value = mean(last ``n`` values) x (1 - haircut) for ``higher``, x (1 + haircut) for
    ``lower``, x ``seasonal_reference`` if given (e.g. last year's same month / the mean of
    the months before it).  Fewer than ``n`` values: all of them are used.  ``decimals``
    (default: the most decimals among the inputs used, at most 4) rounds the value, half to
    even.  ``label`` puts the value under a period label in the YAML snippet.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be higher or lower, got {direction!r}")
    values = [v for v in history if v is not None]
    if not values:
        raise ValueError("history has no values")
    used = values[-n:]
    exact_used = [exact_number(v, "history value") for v in used]
    h = exact_number(haircut, "haircut")
    if not 0 <= h < 1:
        raise ValueError("haircut must be in [0, 1)")
    mean = sum(exact_used, Fraction(0)) / len(exact_used)
    value = mean * (1 - h if direction == "higher" else 1 + h)
    season = Fraction(1)
    if seasonal_reference is not None:
        season = exact_number(seasonal_reference, "seasonal_reference")
        if season <= 0:
            raise ValueError("seasonal_reference must be positive")
        value *= season
    places = decimals if decimals is not None else max(_input_places(v) for v in used)
    rounded = Decimal(fmt(value, places))
    sign = "-" if direction == "higher" else "+"
    comment = (f"# {kpi_id + ': ' if kpi_id else ''}mean of the last {len(used)} period(s) {fmt(mean)}, "
               f"{sign}{fmt(h * 100, 2).rstrip('0').rstrip('.')} % ({direction} is better)")
    if seasonal_reference is not None:
        comment += f", x {fmt(season)} seasonal"
    if label is None:
        snippet = f"{comment}\ntarget: {rounded}\n"
    else:
        snippet = f'{comment}\ntarget:\n  "{label}": {rounded}\n'
    return TargetSuggestion(rounded, value, mean, len(used), snippet)
