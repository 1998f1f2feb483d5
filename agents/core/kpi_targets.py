"""Target suggestions from the actuals of closed periods.  Pure.

This module owns :func:`suggest_target`: the mean of the last periods' actuals
with a haircut (and optionally a seasonal factor), rounded half to even to the
inputs' decimals, and a YAML snippet to paste into ``config/kpis.yaml``
(``kpimon ledger suggest-target`` prints it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from kpimon.agents.core.kpi_scoring import Direction, exact_number, exact_places, fmt

__all__ = ["TargetSuggestion", "suggest_target"]



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
    return exact_places(Fraction(value))


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
