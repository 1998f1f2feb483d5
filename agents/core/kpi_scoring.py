"""Exact numbers, attainment, payout curves and status: the scoring rules.  Pure.

This module owns the arithmetic that turns a KPI's value and target into a
score.  All arithmetic is exact (:class:`fractions.Fraction`); rounding happens
only when a value is written out (:func:`fmt`), half to even, with a fixed
number of decimals.  The rules (documented in ``docs/kpis.md``):

* attainment = actual / target (``direction: higher``) or target / actual
  (``lower``); a ``lower`` KPI whose actual is 0 (or below) is the best possible
  outcome: attainment ``None``, multiplier = top of the curve;
* payout: piecewise linear through the curve's points, ``floor`` below the
  first point, flat after the last one, clamped to ``[floor, cap]``;
* status: on_track, at_risk or off_track by the (projected) attainment against
  the KPI's thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal, overload

from kpimon.agents.core.formula import to_fraction

__all__ = [
    "DEFAULT_CURVE",
    "STATUSES",
    "Curve",
    "Direction",
    "attainment",
    "exact_number",
    "exact_places",
    "fmt",
    "is_best",
    "payout",
    "status_for",
    "top_attainment",
]

STATUSES = ("on_track", "at_risk", "off_track", "no_data", "no_target")
Direction = Literal["higher", "lower"]


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


def exact_places(value: Fraction | None) -> int:
    """Decimals needed to write ``value`` exactly (at most 4 beyond the integer)."""
    if value is None:
        return 0
    for places in range(5):
        if (value * 10**places).denominator == 1:
            return places
    return 4


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


def top_attainment(curve: Any) -> Fraction:
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


def is_best(actual: Fraction | None, target: Fraction | None, direction: str) -> bool:
    return direction == "lower" and actual is not None and target is not None and target != 0 and actual <= 0



def status_for(projected: Fraction | None, at_risk: Any = Fraction(19, 20), off_track: Any = Fraction(4, 5)) -> str:
    """on_track if projected >= at_risk, at_risk if >= off_track, else off_track; no_data if None."""
    if projected is None:
        return "no_data"
    if projected >= exact_number(at_risk, "at_risk"):
        return "on_track"
    if projected >= exact_number(off_track, "off_track"):
        return "at_risk"
    return "off_track"
