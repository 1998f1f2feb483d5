"""Calendar periods (day, ISO week, month, quarter, year) in an IANA timezone.

Pure standard-library code used on the hot path of the stream processor.

Semantics
---------
* A period is a half-open interval ``[start_ms, end_ms)`` of UTC epoch
  milliseconds.
* Day *d* starts at the first instant whose local date is *d* or later.  That
  is local midnight, or -- when midnight does not exist because of a DST gap
  (e.g. America/Sao_Paulo 2018-11-04) -- the first instant after the gap.
  Every period of every grain starts at the start of its first local date and
  ends at the start of the first local date after it, so all boundaries of all
  grains are day boundaries.
* An instant belongs to the day whose start is the latest day start at or
  before it.  For all zones where the local date never runs backwards this is
  simply the local date of the instant.  (If a zone ever sets its clocks back
  across midnight, the repeated late-evening stretch is counted in the new
  day.  A local date that was skipped entirely, such as Pacific/Apia
  2011-12-30, is an empty period: ``parse()`` returns it with
  ``start_ms == end_ms`` and no instant ever maps to it.)
* ISO weeks start on Monday and are labelled with the ISO year, which differs
  from the calendar year around New Year (2024-12-30 is in ``2025-W01``).

Performance
-----------
Day starts are memoised per local date, each day's five periods are built
once and the most recently used day is kept in ``Calendar._last``: looking up
an instant in the same day as the previous lookup is two comparisons and a
dict lookup; the day before that is kept too (late events around midnight).
A miss is a couple of dict lookups; only the first lookup of a new day touches
``zoneinfo``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from functools import cache
from typing import cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "GRAINS",
    "MAX_TS_MS",
    "MAX_YEAR",
    "MIN_TS_MS",
    "MIN_YEAR",
    "Calendar",
    "Grain",
    "Period",
    "format_duration",
    "get_calendar",
    "parse_duration",
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

_DAY_MS = 86_400_000
_ONE_MS = timedelta(milliseconds=1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORD = date(1970, 1, 1).toordinal()

#: Supported calendar years (labels) and UTC instants.  The margins keep every
#: intermediate ``datetime`` well inside ``datetime.min .. datetime.max``.
MIN_YEAR = 3
MAX_YEAR = 9997
MIN_TS_MS = (date(MIN_YEAR, 1, 1).toordinal() - _EPOCH_ORD) * _DAY_MS
MAX_TS_MS = (date(MAX_YEAR + 1, 1, 1).toordinal() - _EPOCH_ORD) * _DAY_MS  # exclusive

_MAX_CACHED_DAYS = 1 << 14  # ~45 years of days per calendar before the caches reset

_GRAIN_NAMES = ", ".join(g.value for g in GRAINS)


def _coerce_grain(grain: Grain | str) -> Grain:
    if type(grain) is Grain:
        return grain
    try:
        return Grain(grain)
    except ValueError:
        raise ValueError(f"unknown grain {grain!r}: expected one of {_GRAIN_NAMES}") from None


def _coerce_ts(ts_ms: object) -> int:
    if isinstance(ts_ms, int):
        return int(ts_ms)
    if isinstance(ts_ms, float):
        if not math.isfinite(ts_ms):
            raise ValueError(f"timestamp must be finite, got {ts_ms!r}")
        return math.floor(ts_ms)
    raise TypeError(f"timestamp must be int epoch milliseconds, got {type(ts_ms).__name__}")


def _check_range(ts_ms: int) -> None:
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


def _span(grain: Grain, day: date) -> tuple[int, int, str]:
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


def _label_first_day(grain: Grain, label: str) -> date:
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


# --------------------------------------------------------------------------- #


class _Day:
    """Everything about one local date that lookups need."""

    __slots__ = ("ordinal", "start", "end", "periods", "by_grain", "ending")

    def __init__(self, ordinal: int, start: int, end: int, periods: tuple[Period, ...]) -> None:
        self.ordinal = ordinal
        self.start = start
        self.end = end
        self.periods = periods
        # keyed by Grain; Grain is a StrEnum with str hashing, so "day" works too
        self.by_grain: dict[str, Period] = dict(zip(GRAINS, periods))
        self.ending = tuple(p for p in periods if p.end_ms == end)


_NO_DAY = _Day(0, 0, 0, ())  # empty interval: never matches


class Calendar:
    """Calendar periods in one IANA timezone.  Cheap to query; keeps caches."""

    __slots__ = ("tz_name", "_tz", "_last", "_prev", "_days", "_starts", "_periods")

    def __init__(self, tz: str) -> None:
        if not isinstance(tz, str):
            raise TypeError(f"timezone must be a str, got {type(tz).__name__}")
        # ZoneInfoNotFoundError (a KeyError): no such zone; ValueError: a key that is not a normalized
        # relative path, or a file that is not TZif; OSError: an unreadable path (e.g. a directory).
        try:
            zone = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown timezone {tz!r}") from None
        self.tz_name: str = tz
        self._tz = zone
        self._last: _Day = _NO_DAY  # day of the latest lookup
        self._prev: _Day = _NO_DAY  # the one before (late events around midnight)
        self._days: dict[int, _Day] = {}
        self._starts: dict[int, int] = {}
        self._periods: dict[tuple[Grain, int], Period] = {}

    def __repr__(self) -> str:
        return f"Calendar({self.tz_name!r})"

    def __reduce__(self):  # pickle the zone name, not the caches
        return (Calendar, (self.tz_name,))

    # ------------------------------------------------------------------ hot path

    def period_at(self, ts_ms: int, grain: Grain) -> Period:
        d = self._last
        if d.start <= ts_ms < d.end:
            try:
                return d.by_grain[grain]
            except KeyError:
                pass
        else:
            d = self._lookup(ts_ms)
            try:
                return d.by_grain[grain]
            except KeyError:
                pass
        return d.by_grain[_coerce_grain(grain)]

    def periods_at(self, ts_ms: int) -> tuple[Period, ...]:
        d = self._last
        if d.start <= ts_ms < d.end:
            return d.periods
        return self._lookup(ts_ms).periods

    def day_start(self, ts_ms: int) -> int:
        d = self._last
        if d.start <= ts_ms < d.end:
            return d.start
        return self._lookup(ts_ms).start

    def next_boundary(self, ts_ms: int) -> int:
        d = self._last
        if d.start <= ts_ms < d.end:
            return d.end
        return self._lookup(ts_ms).end

    # --------------------------------------------------------------- other API

    def boundaries_between(self, lo_ms: int, hi_ms: int) -> Iterator[int]:
        """Day boundaries ``b`` with ``lo_ms < b <= hi_ms``, ascending."""
        if not hi_ms > lo_ms:
            return
        d = self._lookup(lo_ms)
        b = d.end
        while b <= hi_ms:
            yield b
            if b >= MAX_TS_MS:
                return
            d = self._lookup(b)
            b = d.end

    def periods_ending_at(self, boundary_ms: int) -> tuple[Period, ...]:
        """Non-empty periods (any grain) with ``end_ms == boundary_ms``, GRAINS order."""
        boundary_ms = _coerce_ts(boundary_ms)
        d = self._lookup(boundary_ms - 1)
        return d.ending if d.end == boundary_ms else ()

    def periods_between(self, lo_ms: int, hi_ms: int, grain: Grain) -> list[Period]:
        """All periods of ``grain`` overlapping ``[lo_ms, hi_ms)``, ascending."""
        grain = _coerce_grain(grain)
        out: list[Period] = []
        if not hi_ms > lo_ms:
            return out
        p = self._lookup(lo_ms).by_grain[grain]
        while True:
            out.append(p)
            if p.end_ms >= hi_ms:
                return out
            p = self._lookup(p.end_ms).by_grain[grain]

    def parse(self, grain: Grain | str, label: str) -> Period:
        """Inverse of the labels: the period of ``grain`` called ``label``."""
        grain = _coerce_grain(grain)
        return self._period(grain, _label_first_day(grain, label))

    def iso(self, ts_ms: int) -> str:
        """RFC 3339 local time with offset, e.g. ``2024-03-10T00:00:00-05:00``.

        Milliseconds are shown only when non-zero.  Historical offsets with a
        seconds component (e.g. Africa/Monrovia -00:44:30 before 1972) are
        written ``-00:44:30`` like ``datetime.isoformat`` so the string still
        denotes the exact instant.
        """
        ts = _coerce_ts(ts_ms)
        _check_range(ts)
        dt = self._local(ts)
        off = cast(timedelta, dt.utcoffset())  # aware datetime (astimezone): never None
        secs = off.days * 86_400 + off.seconds
        sign = "+" if secs >= 0 else "-"
        hh, rem = divmod(abs(secs), 3600)
        mm, ss = divmod(rem, 60)
        offset = f"{sign}{hh:02d}:{mm:02d}" + (f":{ss:02d}" if ss else "")
        ms = ts % 1000
        frac = f".{ms:03d}" if ms else ""
        return (
            f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T"
            f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}{frac}{offset}"
        )

    # --------------------------------------------------------------- internals

    def _lookup(self, ts_ms: int) -> _Day:
        d = self._prev
        if d.start <= ts_ms < d.end:
            self._prev = self._last
            self._last = d
            return d
        if type(ts_ms) is not int:
            ts_ms = _coerce_ts(ts_ms)
        _check_range(ts_ms)
        # The local date is within one day of the UTC date.
        d = self._day(ts_ms // _DAY_MS + _EPOCH_ORD)
        while ts_ms < d.start:
            d = self._day(d.ordinal - 1)
        while ts_ms >= d.end:
            d = self._day(d.ordinal + 1)
        self._prev = self._last
        self._last = d
        return d

    def _day(self, ordinal: int) -> _Day:
        d = self._days.get(ordinal)
        if d is None:
            if len(self._days) >= _MAX_CACHED_DAYS:
                self._days.clear()
                self._starts.clear()
                self._periods.clear()
            day = date.fromordinal(ordinal)
            periods = tuple(self._period(g, day) for g in GRAINS)
            d = _Day(ordinal, periods[0].start_ms, periods[0].end_ms, periods)
            self._days[ordinal] = d
        return d

    def _period(self, grain: Grain, day: date) -> Period:
        first, after, label = _span(grain, day)
        key = (grain, first)
        p = self._periods.get(key)
        if p is None:
            p = Period(grain, label, self._start(first), self._start(after))
            self._periods[key] = p
        return p

    def _start(self, ordinal: int) -> int:
        s = self._starts.get(ordinal)
        if s is None:
            s = self._starts[ordinal] = self._compute_start(ordinal)
        return s

    def _local(self, ts_ms: int) -> datetime:
        return (_EPOCH_UTC + timedelta(milliseconds=ts_ms)).astimezone(self._tz)

    def _compute_start(self, ordinal: int) -> int:
        """First instant (epoch ms) whose local date is ``ordinal`` or later."""
        tz = self._tz
        day = date.fromordinal(ordinal)
        # Deliberately naive: local wall-clock midnight, compared below with naive local times.
        midnight = datetime(day.year, day.month, day.day)  # noqa: DTZ001 - naive local wall time on purpose
        midnight_ms = (ordinal - _EPOCH_ORD) * _DAY_MS
        candidates: list[int] = []
        valid: list[int] = []
        for fold in (0, 1):
            # aware (tzinfo=tz): never None; cold path (once per local date, memoised by _start)
            off = cast(timedelta, midnight.replace(tzinfo=tz, fold=fold).utcoffset())
            u = midnight_ms - off // _ONE_MS
            candidates.append(u)
            if self._local(u).replace(tzinfo=None) == midnight:
                valid.append(u)
        if valid:  # midnight exists (twice if ambiguous: take the first)
            return min(valid)

        # Midnight falls in a DST gap: find the transition instant, i.e. the
        # first instant whose local wall time is >= midnight.  PEP 495 maps a
        # missing time with the offset before (fold=0) and after (fold=1) the
        # gap, which brackets the transition.
        def reached(u: int) -> bool:
            return self._local(u).replace(tzinfo=None) >= midnight

        lo, hi = min(candidates), max(candidates)
        if reached(lo) or not reached(hi):  # pragma: no cover - defensive
            lo, hi = midnight_ms - 2 * _DAY_MS, midnight_ms + 2 * _DAY_MS
        while hi - lo > 1:  # invariant: not reached(lo), reached(hi)
            mid = (lo + hi) // 2
            if reached(mid):
                hi = mid
            else:
                lo = mid
        return hi


@cache
def get_calendar(tz: str) -> Calendar:
    """Shared Calendar per timezone name, so its caches are shared too."""
    return Calendar(tz)


# --------------------------------------------------------------------------- #
# durations

_UNITS: tuple[tuple[str, int], ...] = (
    ("w", 7 * _DAY_MS),
    ("d", _DAY_MS),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
)
_UNIT_MS = dict(_UNITS)
_UNIT_RANK = {u: i for i, (u, _) in enumerate(_UNITS)}
_DURATION_RE = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w))+")
_PART_RE = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> int:
    """Parse ``500ms``, ``30s``, ``5m``, ``2h``, ``7d``, ``1w`` or combinations
    such as ``1h30m`` (largest unit first, each unit at most once) into
    milliseconds.  Surrounding whitespace is ignored."""
    if not isinstance(text, str):
        raise TypeError(f"duration must be a str, got {type(text).__name__}")
    s = text.strip()
    if not _DURATION_RE.fullmatch(s):
        raise ValueError(
            f"invalid duration {text!r}: expected a number followed by ms, s, m, h, d or w"
        )
    total = 0
    last_rank = -1
    for number, unit in _PART_RE.findall(s):
        rank = _UNIT_RANK[unit]
        if rank <= last_rank:
            raise ValueError(
                f"invalid duration {text!r}: units must appear at most once, "
                f"largest first (w, d, h, m, s, ms)"
            )
        last_rank = rank
        total += int(number) * _UNIT_MS[unit]
    return total


def format_duration(ms: int) -> str:
    """Canonical form of a duration: largest units first, each component below
    the next larger unit (``1h30m``, not ``90m``), days as the largest unit
    (``7d``, ``14d``; weeks are accepted by :func:`parse_duration` but never
    produced), ``0s`` for zero."""
    if isinstance(ms, bool) or not isinstance(ms, int):
        raise TypeError(f"duration must be int milliseconds, got {type(ms).__name__}")
    if ms < 0:
        raise ValueError(f"duration must be >= 0 ms, got {ms}")
    if ms == 0:
        return "0s"
    parts: list[str] = []
    rest = ms
    for unit, size in _UNITS[1:]:  # d, h, m, s, ms
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)
