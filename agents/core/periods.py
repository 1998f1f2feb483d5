"""Calendar periods (day, ISO week, month, quarter, year) in an IANA timezone.

This module owns :class:`Calendar`, which maps UTC instants to the periods
containing them in one timezone (and back: labels to periods, day boundaries,
the periods ending at a boundary), with the caches that make that cheap, and
:func:`get_calendar`, the shared calendar per zone.  Pure standard-library code
used on the hot path of the stream processor.

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

Performance
-----------
Day starts are memoised per local date, each day's five periods are built
once and the most recently used day is kept in ``Calendar._last``: looking up
an instant in the same day as the previous lookup is two comparisons and a
dict lookup; the day before that is kept too (late events around midnight).
A miss is a couple of dict lookups; only the first lookup of a new day touches
``zoneinfo``.

Grains, :class:`~agents.core.grains.Period` and label syntax live in
:mod:`agents.core.grains`, durations in :mod:`agents.core.durations`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kpimon.agents.core.grains import (
    DAY_MS,
    EPOCH_ORD,
    GRAINS,
    MAX_TS_MS,
    Grain,
    Period,
    check_range,
    coerce_grain,
    coerce_ts,
    label_first_day,
    span,
)

__all__ = ["Calendar", "get_calendar"]

_ONE_MS = timedelta(milliseconds=1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_CACHED_DAYS = 1 << 14  # ~45 years of days per calendar before the caches reset


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
        return d.by_grain[coerce_grain(grain)]

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
        boundary_ms = coerce_ts(boundary_ms)
        d = self._lookup(boundary_ms - 1)
        return d.ending if d.end == boundary_ms else ()

    def periods_between(self, lo_ms: int, hi_ms: int, grain: Grain) -> list[Period]:
        """All periods of ``grain`` overlapping ``[lo_ms, hi_ms)``, ascending."""
        grain = coerce_grain(grain)
        out: list[Period] = []
        if not hi_ms > lo_ms:
            return out
        p = self._lookup(lo_ms).by_grain[grain]
        while True:
            out.append(p)
            if p.end_ms >= hi_ms:
                return out
            p = self._lookup(p.end_ms).by_grain[grain]

    def day_ordinal(self, ts_ms: int) -> int:
        """The proleptic Gregorian ordinal (``date.toordinal``) of the local day containing ``ts_ms``."""
        return self._lookup(ts_ms).ordinal

    def periods_of_day(self, ordinal: int) -> tuple[Period, ...]:
        """The periods (GRAINS order) of the local date ``ordinal``; leaves the hot path's caches alone."""
        return self._day(ordinal).periods

    def parse(self, grain: Grain | str, label: str) -> Period:
        """Inverse of the labels: the period of ``grain`` called ``label``."""
        grain = coerce_grain(grain)
        return self._period(grain, label_first_day(grain, label))

    def iso(self, ts_ms: int) -> str:
        """RFC 3339 local time with offset, e.g. ``2024-03-10T00:00:00-05:00``.

        Milliseconds are shown only when non-zero.  Historical offsets with a
        seconds component (e.g. Africa/Monrovia -00:44:30 before 1972) are
        written ``-00:44:30`` like ``datetime.isoformat`` so the string still
        denotes the exact instant.
        """
        ts = coerce_ts(ts_ms)
        check_range(ts)
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
            ts_ms = coerce_ts(ts_ms)
        check_range(ts_ms)
        # The local date is within one day of the UTC date.
        d = self._day(ts_ms // DAY_MS + EPOCH_ORD)
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
        first, after, label = span(grain, day)
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
        midnight_ms = (ordinal - EPOCH_ORD) * DAY_MS
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
            lo, hi = midnight_ms - 2 * DAY_MS, midnight_ms + 2 * DAY_MS
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
