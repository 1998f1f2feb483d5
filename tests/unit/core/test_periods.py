"""Tests for agents.core.periods, agents.core.grains and agents.core.durations: calendar periods in IANA
timezones, grains and period labels, and durations."""

from __future__ import annotations

import ast
import pickle
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kpimon.agents.core.durations as durations_mod
import kpimon.agents.core.grains as grains_mod
import kpimon.agents.core.periods as periods_mod
from kpimon.agents.core.durations import format_duration, parse_duration
from kpimon.agents.core.grains import GRAINS, Grain, Period
from kpimon.agents.core.periods import Calendar, get_calendar

D, W, M, Q, Y = Grain.DAY, Grain.WEEK, Grain.MONTH, Grain.QUARTER, Grain.YEAR
HOUR = 3_600_000
DAY = 24 * HOUR
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(text: str) -> int:
    """Epoch ms of an ISO-8601 string that carries its own offset."""
    dt = datetime.fromisoformat(text)
    assert dt.tzinfo is not None, text
    return (dt - EPOCH) // timedelta(milliseconds=1)


def local(tz: str, ts_ms: int) -> datetime:
    return (EPOCH + timedelta(milliseconds=ts_ms)).astimezone(ZoneInfo(tz))


def cal(tz: str) -> Calendar:
    return Calendar(tz)


# --------------------------------------------------------------------------- #
# API shape


def test_grains_order_and_values():
    assert GRAINS == (D, W, M, Q, Y)
    assert [g.value for g in GRAINS] == ["day", "week", "month", "quarter", "year"]
    assert Grain("week") is W and W == "week"


def test_period_contains_is_half_open():
    p = Period(D, "2024-03-14", 100, 200)
    assert p.contains(100) and p.contains(199)
    assert not p.contains(99) and not p.contains(200)
    with pytest.raises(AttributeError):
        p.start_ms = 5  # type: ignore[misc]


@pytest.mark.parametrize("mod", [periods_mod, grains_mod, durations_mod], ids=lambda m: m.__name__)
def test_module_imports_only_stdlib(mod):
    """Standard library only; periods may import grains, its sibling (itself standard library only)."""
    tree = ast.parse(Path(mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(grains_mod.__name__ if node.module == grains_mod.__name__ else node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | ({grains_mod.__name__} if mod is periods_mod else set())
    assert imported <= allowed, imported - allowed


# --------------------------------------------------------------------------- #
# boundaries: the start instant is in the period, 1 ms earlier is in the previous one

BOUNDARY_CASES = [
    # tz, grain, start of the period (local, with offset), its label, previous label
    ("UTC", D, "2024-03-14T00:00:00+00:00", "2024-03-14", "2024-03-13"),
    ("UTC", D, "2024-03-01T00:00:00+00:00", "2024-03-01", "2024-02-29"),
    ("UTC", D, "1970-01-01T00:00:00+00:00", "1970-01-01", "1969-12-31"),
    ("UTC", W, "2024-03-11T00:00:00+00:00", "2024-W11", "2024-W10"),
    ("UTC", W, "2020-12-28T00:00:00+00:00", "2020-W53", "2020-W52"),
    ("UTC", W, "2021-01-04T00:00:00+00:00", "2021-W01", "2020-W53"),
    ("UTC", W, "2024-12-30T00:00:00+00:00", "2025-W01", "2024-W52"),
    ("UTC", W, "2025-12-29T00:00:00+00:00", "2026-W01", "2025-W52"),
    ("UTC", W, "2026-12-28T00:00:00+00:00", "2026-W53", "2026-W52"),
    ("UTC", W, "2027-01-04T00:00:00+00:00", "2027-W01", "2026-W53"),
    ("UTC", M, "2024-03-01T00:00:00+00:00", "2024-03", "2024-02"),
    ("UTC", M, "2024-01-01T00:00:00+00:00", "2024-01", "2023-12"),
    ("UTC", Q, "2024-01-01T00:00:00+00:00", "2024-Q1", "2023-Q4"),
    ("UTC", Q, "2024-04-01T00:00:00+00:00", "2024-Q2", "2024-Q1"),
    ("UTC", Q, "2024-07-01T00:00:00+00:00", "2024-Q3", "2024-Q2"),
    ("UTC", Q, "2024-10-01T00:00:00+00:00", "2024-Q4", "2024-Q3"),
    ("UTC", Y, "2024-01-01T00:00:00+00:00", "2024", "2023"),
    ("UTC", Y, "2100-01-01T00:00:00+00:00", "2100", "2099"),
    # America/New_York: 2024-03-10 has 23 hours, 2024-11-03 has 25
    ("America/New_York", D, "2024-03-10T00:00:00-05:00", "2024-03-10", "2024-03-09"),
    ("America/New_York", D, "2024-03-11T00:00:00-04:00", "2024-03-11", "2024-03-10"),
    ("America/New_York", D, "2024-11-03T00:00:00-04:00", "2024-11-03", "2024-11-02"),
    ("America/New_York", D, "2024-11-04T00:00:00-05:00", "2024-11-04", "2024-11-03"),
    ("America/New_York", W, "2024-03-11T00:00:00-04:00", "2024-W11", "2024-W10"),
    ("America/New_York", W, "2024-11-04T00:00:00-05:00", "2024-W45", "2024-W44"),
    ("America/New_York", M, "2024-11-01T00:00:00-04:00", "2024-11", "2024-10"),
    ("America/New_York", Q, "2024-04-01T00:00:00-04:00", "2024-Q2", "2024-Q1"),
    ("America/New_York", Y, "2025-01-01T00:00:00-05:00", "2025", "2024"),
    # Europe/Berlin: DST 2024-03-31 02:00 -> 03:00, 2024-10-27 03:00 -> 02:00
    ("Europe/Berlin", D, "2024-03-31T00:00:00+01:00", "2024-03-31", "2024-03-30"),
    ("Europe/Berlin", D, "2024-04-01T00:00:00+02:00", "2024-04-01", "2024-03-31"),
    ("Europe/Berlin", D, "2024-10-27T00:00:00+02:00", "2024-10-27", "2024-10-26"),
    ("Europe/Berlin", D, "2024-10-28T00:00:00+01:00", "2024-10-28", "2024-10-27"),
    ("Europe/Berlin", W, "2024-04-01T00:00:00+02:00", "2024-W14", "2024-W13"),
    ("Europe/Berlin", M, "2024-04-01T00:00:00+02:00", "2024-04", "2024-03"),
    ("Europe/Berlin", Y, "2025-01-01T00:00:00+01:00", "2025", "2024"),
    # Asia/Kolkata: +05:30, a non-whole-hour offset
    ("Asia/Kolkata", D, "2024-03-14T00:00:00+05:30", "2024-03-14", "2024-03-13"),
    ("Asia/Kolkata", W, "2024-12-30T00:00:00+05:30", "2025-W01", "2024-W52"),
    ("Asia/Kolkata", Q, "2024-04-01T00:00:00+05:30", "2024-Q2", "2024-Q1"),
    ("Asia/Kolkata", Y, "2024-01-01T00:00:00+05:30", "2024", "2023"),
    # America/Sao_Paulo: 2018-11-04 00:00 did not exist (clocks went 00:00 -> 01:00);
    # 2019-02-17 00:00 -02 fell back to 2019-02-16 23:00 -03.
    ("America/Sao_Paulo", D, "2018-11-04T01:00:00-02:00", "2018-11-04", "2018-11-03"),
    ("America/Sao_Paulo", D, "2018-11-05T00:00:00-02:00", "2018-11-05", "2018-11-04"),
    ("America/Sao_Paulo", W, "2018-11-05T00:00:00-02:00", "2018-W45", "2018-W44"),
    ("America/Sao_Paulo", D, "2019-02-17T00:00:00-03:00", "2019-02-17", "2019-02-16"),
    ("America/Sao_Paulo", D, "2019-02-16T00:00:00-02:00", "2019-02-16", "2019-02-15"),
    # Asia/Kathmandu: +05:30 -> +05:45 at local midnight 1986-01-01: the year starts at 00:15
    ("Asia/Kathmandu", Y, "1986-01-01T00:15:00+05:45", "1986", "1985"),
    ("Asia/Kathmandu", D, "1986-01-01T00:15:00+05:45", "1986-01-01", "1985-12-31"),
    # Pacific/Apia skipped 2011-12-30 entirely
    ("Pacific/Apia", D, "2011-12-31T00:00:00+14:00", "2011-12-31", "2011-12-29"),
    ("Pacific/Apia", W, "2012-01-02T00:00:00+14:00", "2012-W01", "2011-W52"),
]


@pytest.mark.parametrize(
    "tz, grain, start, label, prev_label",
    BOUNDARY_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in BOUNDARY_CASES],
)
def test_start_instant_belongs_to_period_and_1ms_before_to_previous(tz, grain, start, label, prev_label):
    c = cal(tz)
    start_ms = ms(start)
    p = c.period_at(start_ms, grain)
    assert (p.grain, p.label, p.start_ms) == (grain, label, start_ms)
    assert p.contains(start_ms)
    prev = c.period_at(start_ms - 1, grain)
    assert (prev.grain, prev.label, prev.end_ms) == (grain, prev_label, start_ms)
    assert not prev.contains(start_ms)
    # a fresh calendar (cold cache, looked up from the other side) agrees
    c2 = cal(tz)
    assert c2.period_at(start_ms - 1, grain) == prev
    assert c2.period_at(start_ms, grain) == p
    assert c.iso(p.start_ms) == start


DAY_LENGTH_CASES = [
    ("UTC", "2024-03-10", 24),
    ("America/New_York", "2024-03-09", 24),
    ("America/New_York", "2024-03-10", 23),
    ("America/New_York", "2024-03-11", 24),
    ("America/New_York", "2024-11-03", 25),
    ("Europe/Berlin", "2024-03-31", 23),
    ("Europe/Berlin", "2024-10-27", 25),
    ("Asia/Kolkata", "2024-03-10", 24),
    ("America/Sao_Paulo", "2018-11-04", 23),
    ("America/Sao_Paulo", "2019-02-16", 25),
    ("Australia/Lord_Howe", "2024-04-07", 24.5),
    ("Australia/Lord_Howe", "2024-10-06", 23.5),
    ("Asia/Kathmandu", "1986-01-01", 23.75),
    ("Pacific/Apia", "2011-12-29", 24),
    ("Pacific/Apia", "2011-12-30", 0),
]


@pytest.mark.parametrize(
    "tz, label, hours", DAY_LENGTH_CASES, ids=[f"{c[0]}-{c[1]}" for c in DAY_LENGTH_CASES]
)
def test_day_lengths(tz, label, hours):
    p = cal(tz).parse(D, label)
    assert p.end_ms - p.start_ms == hours * HOUR


def test_dst_week_and_month_lengths_new_york():
    c = cal("America/New_York")
    assert (lambda p: p.end_ms - p.start_ms)(c.parse(W, "2024-W10")) == 7 * DAY - HOUR
    assert (lambda p: p.end_ms - p.start_ms)(c.parse(W, "2024-W44")) == 7 * DAY + HOUR
    assert (lambda p: p.end_ms - p.start_ms)(c.parse(M, "2024-03")) == 31 * DAY - HOUR
    assert (lambda p: p.end_ms - p.start_ms)(c.parse(Y, "2024")) == 366 * DAY


def test_fall_back_hour_in_same_day():
    """Both 01:30 of 2024-11-03 in New York are in the same (25-hour) day."""
    c = cal("America/New_York")
    first, second = ms("2024-11-03T01:30:00-04:00"), ms("2024-11-03T01:30:00-05:00")
    assert second - first == HOUR
    assert c.period_at(first, D) is c.period_at(second, D)
    assert c.iso(first) == "2024-11-03T01:30:00-04:00"
    assert c.iso(second) == "2024-11-03T01:30:00-05:00"


def test_skipped_day_is_empty_and_never_returned():
    c = cal("Pacific/Apia")
    skipped = c.parse(D, "2011-12-30")
    assert skipped.start_ms == skipped.end_ms == ms("2011-12-31T00:00:00+14:00")
    assert c.period_at(skipped.start_ms, D).label == "2011-12-31"
    assert c.period_at(skipped.start_ms - 1, D).label == "2011-12-29"
    assert [p.label for p in c.periods_ending_at(skipped.start_ms)] == ["2011-12-29"]
    assert [p.label for p in c.periods_between(ms("2011-12-29T12:00:00-10:00"), skipped.start_ms + 1, D)] == [
        "2011-12-29",
        "2011-12-31",
    ]


# --------------------------------------------------------------------------- #
# periods_at / day_start / next_boundary / boundaries_between / periods_ending_at


def test_periods_at_returns_one_per_grain_in_order():
    c = cal("UTC")
    ps = c.periods_at(ms("2024-12-31T23:59:59.999+00:00"))
    assert [p.grain for p in ps] == list(GRAINS)
    assert [p.label for p in ps] == ["2024-12-31", "2025-W01", "2024-12", "2024-Q4", "2024"]


def test_periods_at_2026_new_year():
    c = cal("UTC")
    ps = c.periods_at(ms("2026-01-01T00:00:00+00:00"))
    assert [p.label for p in ps] == ["2026-01-01", "2026-W01", "2026-01", "2026-Q1", "2026"]
    assert ps[1].start_ms == ms("2025-12-29T00:00:00+00:00")
    ps = c.periods_at(ms("2021-01-03T12:00:00+00:00"))
    assert [p.label for p in ps] == ["2021-01-03", "2020-W53", "2021-01", "2021-Q1", "2021"]


NEXT_BOUNDARY_CASES = [
    ("UTC", "2024-03-14T12:00:00+00:00", "2024-03-15T00:00:00+00:00"),
    ("UTC", "2024-03-14T00:00:00+00:00", "2024-03-15T00:00:00+00:00"),  # strictly greater
    ("UTC", "2024-03-14T23:59:59.999+00:00", "2024-03-15T00:00:00+00:00"),
    ("America/New_York", "2024-03-10T00:00:00-05:00", "2024-03-11T00:00:00-04:00"),
    ("America/New_York", "2024-11-03T01:30:00-05:00", "2024-11-04T00:00:00-05:00"),
    ("Asia/Kolkata", "2024-03-14T00:00:00+05:30", "2024-03-15T00:00:00+05:30"),
    ("America/Sao_Paulo", "2018-11-03T23:59:59.999-03:00", "2018-11-04T01:00:00-02:00"),
    ("Pacific/Apia", "2011-12-29T23:00:00-10:00", "2011-12-31T00:00:00+14:00"),
]


@pytest.mark.parametrize(
    "tz, at, expected", NEXT_BOUNDARY_CASES, ids=[f"{c[0]}-{c[1]}" for c in NEXT_BOUNDARY_CASES]
)
def test_next_boundary(tz, at, expected):
    c = cal(tz)
    assert c.next_boundary(ms(at)) == ms(expected)
    assert c.day_start(ms(expected)) == ms(expected)
    assert c.day_start(ms(expected) - 1) <= ms(at)


BETWEEN_CASES = [
    (
        "UTC",
        "2024-03-14T00:00:00+00:00",
        "2024-03-16T00:00:00+00:00",
        ["2024-03-15T00:00:00+00:00", "2024-03-16T00:00:00+00:00"],  # lo excluded, hi included
    ),
    ("UTC", "2024-03-14T00:00:00+00:00", "2024-03-14T23:59:59.999+00:00", []),
    ("UTC", "2024-03-14T00:00:00+00:00", "2024-03-14T00:00:00+00:00", []),
    ("UTC", "2024-03-16T00:00:00+00:00", "2024-03-14T00:00:00+00:00", []),
    (
        "America/New_York",
        "2024-03-09T12:00:00-05:00",
        "2024-03-12T00:00:00-04:00",
        ["2024-03-10T00:00:00-05:00", "2024-03-11T00:00:00-04:00", "2024-03-12T00:00:00-04:00"],
    ),
    (
        "America/Sao_Paulo",
        "2018-11-03T00:00:00-03:00",
        "2018-11-05T12:00:00-02:00",
        ["2018-11-04T00:00:00-03:00", "2018-11-05T00:00:00-02:00"],
    ),
]


@pytest.mark.parametrize(
    "tz, lo, hi, expected", BETWEEN_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in BETWEEN_CASES]
)
def test_boundaries_between(tz, lo, hi, expected):
    assert list(cal(tz).boundaries_between(ms(lo), ms(hi))) == [ms(e) for e in expected]


ENDING_CASES = [
    ("UTC", "2024-01-01T00:00:00+00:00", ["2023-12-31", "2023-W52", "2023-12", "2023-Q4", "2023"]),
    ("America/New_York", "2024-01-01T00:00:00-05:00", ["2023-12-31", "2023-W52", "2023-12", "2023-Q4", "2023"]),
    ("Asia/Kolkata", "2029-01-01T00:00:00+05:30", ["2028-12-31", "2028-W52", "2028-12", "2028-Q4", "2028"]),
    ("UTC", "2025-01-01T00:00:00+00:00", ["2024-12-31", "2024-12", "2024-Q4", "2024"]),  # a Wednesday
    ("UTC", "2024-04-01T00:00:00+00:00", ["2024-03-31", "2024-W13", "2024-03", "2024-Q1"]),  # a Monday
    ("UTC", "2024-10-01T00:00:00+00:00", ["2024-09-30", "2024-09", "2024-Q3"]),
    ("UTC", "2024-03-11T00:00:00+00:00", ["2024-03-10", "2024-W10"]),
    ("UTC", "2024-03-14T00:00:00+00:00", ["2024-03-13"]),
    ("America/Sao_Paulo", "2018-11-04T01:00:00-02:00", ["2018-11-03"]),
    ("UTC", "2024-03-14T00:00:00.001+00:00", []),  # not a boundary
    ("America/New_York", "2024-01-01T00:00:00+00:00", []),  # UTC midnight is not a NY boundary
]


@pytest.mark.parametrize(
    "tz, boundary, labels", ENDING_CASES, ids=[f"{c[0]}-{c[1]}" for c in ENDING_CASES]
)
def test_periods_ending_at(tz, boundary, labels):
    got = cal(tz).periods_ending_at(ms(boundary))
    assert [p.label for p in got] == labels
    assert all(p.end_ms == ms(boundary) for p in got)
    assert [p.grain for p in got] == [g for g in GRAINS if g in {p.grain for p in got}]


def test_periods_ending_at_year_end_returns_all_five_grains():
    got = cal("UTC").periods_ending_at(ms("2024-01-01T00:00:00+00:00"))
    assert tuple(p.grain for p in got) == GRAINS


PERIODS_BETWEEN_CASES = [
    ("UTC", M, "2024-01-15T00:00:00+00:00", "2024-04-01T00:00:00+00:00", ["2024-01", "2024-02", "2024-03"]),
    ("UTC", M, "2024-01-15T00:00:00+00:00", "2024-04-01T00:00:00.001+00:00",
     ["2024-01", "2024-02", "2024-03", "2024-04"]),
    ("UTC", Q, "2023-12-31T00:00:00+00:00", "2024-01-01T00:00:00.001+00:00", ["2023-Q4", "2024-Q1"]),
    ("UTC", W, "2020-12-27T00:00:00+00:00", "2021-01-05T00:00:00+00:00", ["2020-W52", "2020-W53", "2021-W01"]),
    ("UTC", D, "2024-03-14T05:00:00+00:00", "2024-03-14T06:00:00+00:00", ["2024-03-14"]),
    ("UTC", Y, "2024-03-14T05:00:00+00:00", "2024-03-14T05:00:00+00:00", []),
    ("America/New_York", D, "2024-03-09T23:00:00-05:00", "2024-03-11T00:00:00-04:00", ["2024-03-09", "2024-03-10"]),
]


@pytest.mark.parametrize(
    "tz, grain, lo, hi, labels",
    PERIODS_BETWEEN_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in PERIODS_BETWEEN_CASES],
)
def test_periods_between(tz, grain, lo, hi, labels):
    got = cal(tz).periods_between(ms(lo), ms(hi), grain)
    assert [p.label for p in got] == labels
    assert all(p.grain == grain for p in got)


# --------------------------------------------------------------------------- #
# labels and parse()

ROUNDTRIP_CASES = [
    ("UTC", D, "2024-02-29"),
    ("UTC", W, "2020-W53"),
    ("UTC", W, "2025-W01"),
    ("UTC", W, "2026-W53"),
    ("UTC", M, "2024-12"),
    ("UTC", Q, "2024-Q4"),
    ("UTC", Y, "1970"),
    ("America/New_York", D, "2024-03-10"),
    ("America/New_York", W, "2024-W44"),
    ("Europe/Berlin", M, "2024-10"),
    ("Asia/Kolkata", Q, "2024-Q2"),
    ("America/Sao_Paulo", D, "2018-11-04"),
    ("America/Sao_Paulo", W, "2018-W44"),
    ("Asia/Kathmandu", Y, "1986"),
]


@pytest.mark.parametrize(
    "tz, grain, label", ROUNDTRIP_CASES, ids=[f"{c[0]}-{c[2]}" for c in ROUNDTRIP_CASES]
)
def test_parse_round_trips(tz, grain, label):
    c = cal(tz)
    p = c.parse(grain, label)
    assert p.label == label and p.grain == grain
    assert c.period_at(p.start_ms, grain) == p
    assert c.period_at(p.end_ms - 1, grain) == p
    assert c.parse(str(grain), label) == p  # plain strings work too


PARSE_EXPECTED = [
    ("UTC", W, "2020-W53", "2020-12-28T00:00:00+00:00", "2021-01-04T00:00:00+00:00"),
    ("UTC", W, "2025-W01", "2024-12-30T00:00:00+00:00", "2025-01-06T00:00:00+00:00"),
    ("UTC", Q, "2024-Q3", "2024-07-01T00:00:00+00:00", "2024-10-01T00:00:00+00:00"),
    ("America/New_York", D, "2024-11-03", "2024-11-03T00:00:00-04:00", "2024-11-04T00:00:00-05:00"),
    ("America/Sao_Paulo", D, "2018-11-04", "2018-11-04T01:00:00-02:00", "2018-11-05T00:00:00-02:00"),
    ("Asia/Kolkata", Y, "2024", "2024-01-01T00:00:00+05:30", "2025-01-01T00:00:00+05:30"),
]


@pytest.mark.parametrize(
    "tz, grain, label, start, end", PARSE_EXPECTED, ids=[f"{c[0]}-{c[2]}" for c in PARSE_EXPECTED]
)
def test_parse_bounds(tz, grain, label, start, end):
    c = cal(tz)
    p = c.parse(grain, label)
    assert (p.start_ms, p.end_ms) == (ms(start), ms(end))
    assert (c.iso(p.start_ms), c.iso(p.end_ms)) == (start, end)


BAD_LABELS = [
    (D, "2024-3-14", "invalid day label '2024-3-14': expected YYYY-MM-DD, e.g. 2024-03-14"),
    (D, "2024-02-30", "invalid day label '2024-02-30': no such date"),
    (D, "2023-02-29", "invalid day label '2023-02-29': no such date"),
    (D, " 2024-03-14", "invalid day label ' 2024-03-14': expected YYYY-MM-DD, e.g. 2024-03-14"),
    (W, "2024-11", "invalid week label '2024-11': expected YYYY-Www (ISO year and week), e.g. 2024-W11"),
    (W, "2021-W53", "invalid week label '2021-W53': ISO year 2021 has weeks 01..52"),
    (W, "2024-W00", "invalid week label '2024-W00': ISO year 2024 has weeks 01..52"),
    (W, "2024-W1", "invalid week label '2024-W1': expected YYYY-Www (ISO year and week), e.g. 2024-W11"),
    (M, "2024-13", "invalid month label '2024-13': month must be 01..12"),
    (M, "2024-00", "invalid month label '2024-00': month must be 01..12"),
    (M, "2024-03-01", "invalid month label '2024-03-01': expected YYYY-MM, e.g. 2024-03"),
    (Q, "2024-Q5", "invalid quarter label '2024-Q5': quarter must be 1..4"),
    (Q, "2024-q1", "invalid quarter label '2024-q1': expected YYYY-Qn with n in 1..4, e.g. 2024-Q1"),
    (Y, "24", "invalid year label '24': expected YYYY, e.g. 2024"),
    (Y, "0000", "invalid year label '0000': year must be between 0003 and 9997"),
    (Y, "２０２４", "invalid year label '２０２４': expected YYYY, e.g. 2024"),  # non-ASCII digits
]


@pytest.mark.parametrize("grain, label, message", BAD_LABELS, ids=[f"{g}-{lbl}" for g, lbl, _ in BAD_LABELS])
def test_parse_rejects_bad_labels(grain, label, message):
    with pytest.raises(ValueError) as exc:
        cal("UTC").parse(grain, label)
    assert str(exc.value) == message


def test_parse_rejects_unknown_grain():
    with pytest.raises(ValueError) as exc:
        cal("UTC").parse("fortnight", "2024-01")
    assert str(exc.value) == "unknown grain 'fortnight': expected one of day, week, month, quarter, year"


def test_period_at_rejects_unknown_grain():
    c = cal("UTC")
    c.period_at(0, D)  # warm the fast path
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown grain 'hour'"):
            c.period_at(0, "hour")  # type: ignore[arg-type]
    assert c.period_at(0, "month").label == "1970-01"  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Calendar construction, iso(), ranges


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "america/new_york_", "../etc/passwd", "/etc/localtime"])
def test_unknown_timezone(name):
    with pytest.raises(ValueError) as exc:
        Calendar(name)
    assert str(exc.value) == f"unknown timezone {name!r}"


def test_tz_name_and_shared_calendar():
    c = Calendar("Europe/Berlin")
    assert c.tz_name == "Europe/Berlin"
    assert repr(c) == "Calendar('Europe/Berlin')"
    assert get_calendar("Europe/Berlin") is get_calendar("Europe/Berlin")
    c2 = pickle.loads(pickle.dumps(c))
    assert c2.tz_name == c.tz_name and c2.period_at(0, D) == c.period_at(0, D)


ISO_CASES = [
    ("UTC", 0, "1970-01-01T00:00:00+00:00"),
    ("UTC", -1, "1969-12-31T23:59:59.999+00:00"),
    ("UTC", ms("2024-03-10T00:00:00.005+00:00"), "2024-03-10T00:00:00.005+00:00"),
    ("America/New_York", ms("2024-03-10T05:00:00+00:00"), "2024-03-10T00:00:00-05:00"),
    ("America/New_York", ms("2024-03-10T07:00:00+00:00"), "2024-03-10T03:00:00-04:00"),
    ("America/New_York", ms("2024-03-10T17:34:56.789+00:00"), "2024-03-10T13:34:56.789-04:00"),
    ("Asia/Kolkata", ms("2024-03-14T00:00:00+00:00"), "2024-03-14T05:30:00+05:30"),
    ("Asia/Kathmandu", 0, "1970-01-01T05:30:00+05:30"),
    ("Europe/Berlin", ms("2024-10-27T01:00:00+00:00"), "2024-10-27T02:00:00+01:00"),
    ("America/Sao_Paulo", ms("2018-11-04T03:00:00+00:00"), "2018-11-04T01:00:00-02:00"),
    ("Africa/Monrovia", 0, "1969-12-31T23:15:30-00:44:30"),  # LMT-style offset with seconds
]


@pytest.mark.parametrize("tz, ts, expected", ISO_CASES, ids=[f"{c[0]}-{c[2]}" for c in ISO_CASES])
def test_iso(tz, ts, expected):
    text = cal(tz).iso(ts)
    assert text == expected
    assert ms(text) == ts


def test_out_of_range_timestamps_raise():
    c = cal("UTC")
    for bad in (grains_mod.MAX_TS_MS, grains_mod.MIN_TS_MS - 1, 10**18):
        with pytest.raises(ValueError, match="outside the supported range"):
            c.period_at(bad, D)
    assert c.period_at(grains_mod.MAX_TS_MS - 1, Y).label == "9997"
    assert c.period_at(grains_mod.MIN_TS_MS, Y).label == "0003"


def test_float_timestamps_floor():
    c = cal("UTC")
    b = ms("2024-03-14T00:00:00+00:00")
    assert c.period_at(float(b) - 0.5, D).label == "2024-03-13"
    assert c.period_at(float(b), D).label == "2024-03-14"
    with pytest.raises(ValueError):
        c.period_at(float("nan"), D)
    with pytest.raises(TypeError):
        c.period_at("2024-03-14", D)  # type: ignore[arg-type]


def test_lookups_share_period_objects():
    c = cal("Europe/Berlin")
    t = ms("2024-03-14T10:00:00+01:00")
    p = c.period_at(t, W)
    assert c.period_at(t + HOUR, W) is p
    assert c.period_at(t + DAY, W) is p  # another day of the same week
    assert c.parse(W, p.label) is p


# --------------------------------------------------------------------------- #
# Hypothesis properties

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Asia/Kolkata",
    "America/Sao_Paulo",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Pacific/Apia",
    "America/Santiago",
    "Africa/Casablanca",
]
LO_MS = ms("1970-01-01T00:00:00+00:00")
HI_MS = ms("2100-01-01T00:00:00+00:00")
CALENDARS = {z: Calendar(z) for z in ZONES}  # shared so the caches get exercised

zones = st.sampled_from(ZONES)
instants = st.integers(min_value=LO_MS, max_value=HI_MS - 1)
grains = st.sampled_from(GRAINS)


@settings(max_examples=300, deadline=None)
@given(zones, instants, grains)
def test_prop_period_contains_instant_and_is_contiguous(tz, ts, grain):
    c = CALENDARS[tz]
    p = c.period_at(ts, grain)
    assert p.grain == grain
    assert p.contains(ts)
    nxt = c.period_at(p.end_ms, grain)
    assert nxt.start_ms == p.end_ms and nxt != p and nxt.label > p.label
    prev = c.period_at(p.start_ms - 1, grain)
    assert prev.end_ms == p.start_ms and prev.label < p.label
    assert c.parse(grain, p.label) == p


@settings(max_examples=300, deadline=None)
@given(zones, instants)
def test_prop_day_matches_local_date_and_coarser_grains_contain_day(tz, ts):
    c = CALENDARS[tz]
    ps = c.periods_at(ts)
    day = ps[0]
    assert [p.grain for p in ps] == list(GRAINS)
    assert tuple(c.period_at(ts, g) for g in GRAINS) == ps
    # independent oracle: the local date of ts, via datetime/zoneinfo
    local_date = local(tz, ts).date()
    assert day.label == local_date.isoformat()
    assert local(tz, day.start_ms).date() == local_date
    assert local(tz, day.start_ms - 1).date() < local_date
    iso_year, iso_week, _ = local_date.isocalendar()
    assert [p.label for p in ps[1:]] == [
        f"{iso_year:04d}-W{iso_week:02d}",
        f"{local_date.year:04d}-{local_date.month:02d}",
        f"{local_date.year:04d}-Q{(local_date.month - 1) // 3 + 1}",
        f"{local_date.year:04d}",
    ]
    for p in ps[1:]:
        assert p.start_ms <= day.start_ms and day.end_ms <= p.end_ms
    assert c.day_start(ts) == day.start_ms
    assert c.next_boundary(ts) == day.end_ms
    assert day in c.periods_ending_at(day.end_ms)
    assert ms(c.iso(ts)) == ts


@settings(max_examples=100, deadline=None)
@given(zones, instants, st.integers(min_value=0, max_value=120 * DAY))
def test_prop_boundaries_between_and_periods_between(tz, lo, span):
    c = CALENDARS[tz]
    hi = min(lo + span, HI_MS)
    bounds = list(c.boundaries_between(lo, hi))
    assert all(lo < b <= hi for b in bounds)
    assert bounds == sorted(set(bounds))
    # walking next_boundary gives the same list
    walk, b = [], c.next_boundary(lo)
    while b <= hi:
        walk.append(b)
        b = c.next_boundary(b)
    assert walk == bounds
    for b in bounds:
        assert c.day_start(b) == b and c.periods_ending_at(b)[0].grain == D
    days = c.periods_between(lo, hi, D)
    if hi > lo:
        assert days[0].contains(lo) and days[-1].start_ms < hi <= days[-1].end_ms
        assert [p.start_ms for p in days[1:]] == [p.end_ms for p in days[:-1]]
        assert [p.start_ms for p in days[1:]] == [b for b in bounds if b < hi]
    else:
        assert days == []


@settings(max_examples=100, deadline=None)
@given(instants, st.sampled_from(ZONES[1:]))
def test_prop_utc_offset_does_not_change_grain_partition_of_local_dates(ts, tz):
    """period boundaries of all grains are day boundaries"""
    c = CALENDARS[tz]
    for p in c.periods_at(ts):
        assert c.day_start(p.start_ms) == p.start_ms
        assert c.day_start(p.end_ms) == p.end_ms


# --------------------------------------------------------------------------- #
# durations

DURATIONS = [
    ("500ms", 500),
    ("30s", 30_000),
    ("5m", 300_000),
    ("2h", 7_200_000),
    ("7d", 604_800_000),
    ("1w", 604_800_000),
    ("1h30m", 5_400_000),
    ("90m", 5_400_000),
    ("1w2d", 9 * DAY),
    ("1d2h3m4s5ms", DAY + 2 * HOUR + 3 * 60_000 + 4_000 + 5),
    ("0s", 0),
    ("0ms", 0),
    (" 15m ", 900_000),
    ("1m500ms", 60_500),
]


@pytest.mark.parametrize("text, expected", DURATIONS, ids=[t for t, _ in DURATIONS])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


FORMATS = [
    (0, "0s"),
    (1, "1ms"),
    (500, "500ms"),
    (1_000, "1s"),
    (60_500, "1m500ms"),
    (5_400_000, "1h30m"),
    (DAY, "1d"),
    (7 * DAY, "7d"),
    (14 * DAY, "14d"),
    (DAY + HOUR + 1, "1d1h1ms"),
    (365 * DAY, "365d"),
]


@pytest.mark.parametrize("value, expected", FORMATS, ids=[e for _, e in FORMATS])
def test_format_duration(value, expected):
    assert format_duration(value) == expected
    assert parse_duration(expected) == value


BAD_DURATIONS = [
    ("5x", "invalid duration '5x': expected a number followed by ms, s, m, h, d or w"),
    ("", "invalid duration '': expected a number followed by ms, s, m, h, d or w"),
    ("h", "invalid duration 'h': expected a number followed by ms, s, m, h, d or w"),
    ("5", "invalid duration '5': expected a number followed by ms, s, m, h, d or w"),
    ("1.5h", "invalid duration '1.5h': expected a number followed by ms, s, m, h, d or w"),
    ("-5m", "invalid duration '-5m': expected a number followed by ms, s, m, h, d or w"),
    ("5M", "invalid duration '5M': expected a number followed by ms, s, m, h, d or w"),
    ("1h 30m", "invalid duration '1h 30m': expected a number followed by ms, s, m, h, d or w"),
    ("30m1h", "invalid duration '30m1h': units must appear at most once, largest first (w, d, h, m, s, ms)"),
    ("1h1h", "invalid duration '1h1h': units must appear at most once, largest first (w, d, h, m, s, ms)"),
]


@pytest.mark.parametrize("text, message", BAD_DURATIONS, ids=[t or "empty" for t, _ in BAD_DURATIONS])
def test_parse_duration_errors(text, message):
    with pytest.raises(ValueError) as exc:
        parse_duration(text)
    assert str(exc.value) == message


def test_format_duration_errors():
    with pytest.raises(ValueError) as exc:
        format_duration(-1)
    assert str(exc.value) == "duration must be >= 0 ms, got -1"
    with pytest.raises(TypeError):
        format_duration(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_duration(5)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=10**13))
def test_prop_duration_round_trip(value):
    text = format_duration(value)
    assert parse_duration(text) == value
    assert format_duration(parse_duration(text)) == text


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=10**6), st.sampled_from(["w", "d", "h", "m", "s", "ms"])),
        min_size=1,
        max_size=6,
        unique_by=lambda t: t[1],
    )
)
def test_prop_parse_duration_sums_components(parts):
    order = ["w", "d", "h", "m", "s", "ms"]
    size = {"w": 7 * DAY, "d": DAY, "h": HOUR, "m": 60_000, "s": 1_000, "ms": 1}
    parts = sorted(parts, key=lambda t: order.index(t[1]))
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == sum(n * size[u] for n, u in parts)
