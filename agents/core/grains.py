"""Grains and periods as values: the grain names, label syntax and date arithmetic.  Pure.

This module owns what a period *is*, independent of any timezone: the five
grains (day, ISO week, month, quarter, year), the :class:`Period` value (a
half-open interval ``[start_ms, end_ms)`` of UTC epoch milliseconds with its
grain and label), the supported range of years and instants, the span and
label of the period of a local date for each grain, and the parsing of
period labels (``2024-03-14``, ``2024-W11``, ``2024-03``, ``2024-Q1``,
``2024``).  ISO weeks start on Monday and are labelled with the ISO year,
which differs from the calendar year around New Year (2024-12-30 is in
``2025-W01``).  Mapping instants to periods in a timezone is
:class:`agents.core.periods.Calendar`'s job.  Standard library only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

__all__ = [
    "DAY_MS",
    "EPOCH_ORD",
    "GRAINS",
    "MAX_TS_MS",
    "MAX_YEAR",
    "MIN_TS_MS",
    "MIN_YEAR",
    "Grain",
    "Period",
    "check_range",
    "coerce_grain",
    "coerce_ts",
    "label_first_day",
    "span",
]


class Grain(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    QUARTER = "quarter"
    YEAR = "year"


GRAINS: tuple[Grain, ...] = (Grain.DAY, Grain.WEEK, Grain.MONTH, Grain.QUARTER, Grain.YEAR)


@dataclass(frozen=True, slots=True)
class Period:
    grain: Grain
    label: str
    start_ms: int
    end_ms: int

    def contains(self, ts_ms: int) -> bool:
        return self.start_ms <= ts_ms < self.end_ms


# --------------------------------------------------------------------------- #
# constants

DAY_MS = 86_400_000
EPOCH_ORD = date(1970, 1, 1).toordinal()

#: Supported calendar years (labels) and UTC instants.  The margins keep every
#: intermediate ``datetime`` well inside ``datetime.min .. datetime.max``.
MIN_YEAR = 3
MAX_YEAR = 9997
MIN_TS_MS = (date(MIN_YEAR, 1, 1).toordinal() - EPOCH_ORD) * DAY_MS
MAX_TS_MS = (date(MAX_YEAR + 1, 1, 1).toordinal() - EPOCH_ORD) * DAY_MS  # exclusive


_GRAIN_NAMES = ", ".join(g.value for g in GRAINS)


def coerce_grain(grain: Grain | str) -> Grain:
    if type(grain) is Grain:
        return grain
    try:
        return Grain(grain)
    except ValueError:
        raise ValueError(f"unknown grain {grain!r}: expected one of {_GRAIN_NAMES}") from None


def coerce_ts(ts_ms: object) -> int:
    if isinstance(ts_ms, int):
        return int(ts_ms)
    if isinstance(ts_ms, float):
        if not math.isfinite(ts_ms):
            raise ValueError(f"timestamp must be finite, got {ts_ms!r}")
        return math.floor(ts_ms)
    raise TypeError(f"timestamp must be int epoch milliseconds, got {type(ts_ms).__name__}")


def check_range(ts_ms: int) -> None:
    if not MIN_TS_MS <= ts_ms < MAX_TS_MS:
        raise ValueError(
            f"timestamp {ts_ms} ms is outside the supported range "
            f"(UTC years {MIN_YEAR:04d}..{MAX_YEAR:04d})"
        )


# --------------------------------------------------------------------------- #
# grain arithmetic on local dates (proleptic Gregorian ordinals)


def _first_of_month_ord(year: int, month: int) -> int:
    return date(year, month, 1).toordinal()


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def span(grain: Grain, day: date) -> tuple[int, int, str]:
    """(first local date ordinal, first date ordinal after, label) of the period of ``day``."""
    if grain is Grain.DAY:
        o = day.toordinal()
        return o, o + 1, day.isoformat()
    if grain is Grain.WEEK:
        iso_year, iso_week, iso_weekday = day.isocalendar()
        monday = day.toordinal() - (iso_weekday - 1)
        return monday, monday + 7, f"{iso_year:04d}-W{iso_week:02d}"
    y, m = day.year, day.month
    if grain is Grain.MONTH:
        return _first_of_month_ord(y, m), _first_of_month_ord(*_next_month(y, m)), f"{y:04d}-{m:02d}"
    if grain is Grain.QUARTER:
        q = (m - 1) // 3
        first_month = 3 * q + 1
        end = _next_month(y, first_month + 2)
        return _first_of_month_ord(y, first_month), _first_of_month_ord(*end), f"{y:04d}-Q{q + 1}"
    if grain is Grain.YEAR:
        return date(y, 1, 1).toordinal(), date(y + 1, 1, 1).toordinal(), f"{y:04d}"
    raise AssertionError(grain)  # pragma: no cover


# --------------------------------------------------------------------------- #
# label parsing

_LABEL_SYNTAX: dict[Grain, tuple[re.Pattern[str], str]] = {
    Grain.DAY: (re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})"), "YYYY-MM-DD, e.g. 2024-03-14"),
    Grain.WEEK: (re.compile(r"([0-9]{4})-W([0-9]{2})"), "YYYY-Www (ISO year and week), e.g. 2024-W11"),
    Grain.MONTH: (re.compile(r"([0-9]{4})-([0-9]{2})"), "YYYY-MM, e.g. 2024-03"),
    Grain.QUARTER: (re.compile(r"([0-9]{4})-Q([0-9])"), "YYYY-Qn with n in 1..4, e.g. 2024-Q1"),
    Grain.YEAR: (re.compile(r"([0-9]{4})"), "YYYY, e.g. 2024"),
}


def label_first_day(grain: Grain, label: str) -> date:
    if not isinstance(label, str):
        raise TypeError(f"{grain.value} label must be a str, got {type(label).__name__}")
    pattern, expected = _LABEL_SYNTAX[grain]
    match = pattern.fullmatch(label)
    if match is None:
        raise ValueError(f"invalid {grain.value} label {label!r}: expected {expected}")
    nums = [int(x) for x in match.groups()]
    year = nums[0]
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise ValueError(
            f"invalid {grain.value} label {label!r}: year must be between "
            f"{MIN_YEAR:04d} and {MAX_YEAR:04d}"
        )
    if grain is Grain.DAY:
        try:
            return date(year, nums[1], nums[2])
        except ValueError:
            raise ValueError(f"invalid day label {label!r}: no such date") from None
    if grain is Grain.WEEK:
        week = nums[1]
        weeks_in_year = date(year, 12, 28).isocalendar()[1]
        if not 1 <= week <= weeks_in_year:
            raise ValueError(
                f"invalid week label {label!r}: ISO year {year:04d} has weeks "
                f"01..{weeks_in_year:02d}"
            )
        return date.fromisocalendar(year, week, 1)
    if grain is Grain.MONTH:
        if not 1 <= nums[1] <= 12:
            raise ValueError(f"invalid month label {label!r}: month must be 01..12")
        return date(year, nums[1], 1)
    if grain is Grain.QUARTER:
        if not 1 <= nums[1] <= 4:
            raise ValueError(f"invalid quarter label {label!r}: quarter must be 1..4")
        return date(year, 3 * nums[1] - 2, 1)
    return date(year, 1, 1)
