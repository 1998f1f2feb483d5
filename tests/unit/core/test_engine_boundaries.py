"""Boundary cases with hand-computed numbers.

Every case runs through three implementations and each must give exactly the
hand-computed numbers:

* ``reference``     -- tests/reference.py, the batch computation of the spec
  (this checks the oracle the property tests rely on);
* ``pipeline-1p``   -- the worker's code path (process_messages -> engine ->
  partials -> Aggregator) with one partition;
* ``pipeline-3p``   -- the same with three partitions.

Settings (tests/factories.py): UTC unless stated, lateness 1h, thresholds
silent 2d, sleeping 4d, churned 8d, dead 16d, warning state sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from kpimon.agents.core.engine import ACCEPTED, DUPLICATE, LATE, EngineConfig, PartitionEngine
from kpimon.streams.events import Decoder
from tests.factories import (
    CHURNED,
    DAY,
    DEAD,
    HOUR,
    SILENT,
    SLEEPING,
    events_factory,
    ms,
    settings_factory,
    to_lines,
)
from tests.pure_pipeline import partitioner, run_pipeline
from tests.reference import reference_report

STATE_NAMES = ("active", "silent", "sleeping", "churned", "dead")


def pop(**counts: int) -> dict[str, int]:
    out = {name: 0 for name in STATE_NAMES}
    out.update(counts)
    return out


@dataclass
class Case:
    id: str
    events: list[dict[str, Any]]
    until: int
    expect: dict[tuple[str, str], dict[str, Any]]
    absent: tuple[tuple[str, str], ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    partitions: tuple[int, ...] = (1, 3)
    totals: dict[str, Any] = field(default_factory=dict)  # checked on the pipeline only


CASES: list[Case] = []

# --------------------------------------------------------------------------- #
# a gap exactly equal to each threshold vs 1 ms more
#
# u1 is active at a1 = 2024-01-10 12:00Z and again at a2 = a1 + gap.  The
# entry into S would be at a1 + T_S (12:00Z on day X); it happens only if a2
# is strictly later.  A win-back needs a gap strictly greater than T_churned.

A1 = ms("2024-01-10T12:00:00Z")
for name, threshold, day_x in (("silent", SILENT, "2024-01-12"), ("sleeping", SLEEPING, "2024-01-14"),
                                ("churned", CHURNED, "2024-01-18"), ("dead", DEAD, "2024-01-26")):
    for extra, label in ((0, "T"), (1, "T+1ms")):
        ev = events_factory()
        gap = threshold + extra
        if name == "dead":
            depth = {"churned": 0, "dead": 1} if extra else {"churned": 1, "dead": 0}
        elif name == "churned":
            depth = {"churned": extra, "dead": 0}
        else:
            depth = {"churned": 0, "dead": 0}
        CASES.append(Case(
            id=f"gap-{name}={label}",
            events=[ev("u1", "signup", A1, channel="organic"), ev("u1", "login", A1 + gap)],
            until=ms("2024-01-31T00:00:00Z"),
            expect={("day", day_x): {
                f"entered_{name}": extra,
                "active_users": 1,
                "won_back": sum(depth.values()),
                "won_back_by_depth": depth,
                "population": pop(active=1),
            }},
        ))

# --------------------------------------------------------------------------- #
# period starts and ends

ev = events_factory()
CASES.append(Case(
    id="midnight-belongs-to-the-new-day",
    events=[ev("u1", "login", "2024-01-10T23:59:59.999Z"), ev("u2", "login", "2024-01-11T00:00:00Z")],
    until=ms("2024-01-13T00:00:00Z"),
    expect={
        ("day", "2024-01-10"): {"active_users": 1, "population": pop(active=1)},
        ("day", "2024-01-11"): {"active_users": 1, "population": pop(active=2)},
        # end Jan 13 00:00: u1 2d+1ms ago (silent), u2 exactly 2d ago (active)
        ("day", "2024-01-12"): {"active_users": 0, "population": pop(active=1, silent=1)},
    },
    absent=(("day", "2024-01-09"),),  # nothing before the first event is reported
))

ev = events_factory()
CASES.append(Case(
    # active at 2024-01-10 00:00Z only: silent at Jan 12 00:00 (in Jan 12, not Jan 11),
    # sleeping at Jan 14 00:00; population is taken just before each day's end.
    id="entry-at-midnight-and-population-at-end",
    events=[ev("u1", "login", "2024-01-10T00:00:00Z")],
    until=ms("2024-01-20T00:00:00Z"),
    expect={
        ("day", "2024-01-10"): {"active_users": 1, "population": pop(active=1)},
        ("day", "2024-01-11"): {"active_users": 0, "entered_silent": 0, "population": pop(active=1)},
        ("day", "2024-01-12"): {"entered_silent": 1, "population": pop(silent=1)},
        ("day", "2024-01-13"): {"entered_sleeping": 0, "population": pop(silent=1)},
        ("day", "2024-01-14"): {"entered_sleeping": 1, "churn_warnings": 1, "population": pop(sleeping=1)},
        ("week", "2024-W02"): {"active_users": 1, "entered_silent": 1, "entered_sleeping": 1,
                               "population": pop(sleeping=1)},
    },
))

ev = events_factory()
CASES.append(Case(
    # 2024-04-01 is a Monday and the first day of Q2.
    id="week-and-quarter-start",
    events=[ev("u1", "login", "2024-03-31T23:59:59.999Z"), ev("u2", "login", "2024-04-01T00:00:00Z")],
    until=ms("2024-04-08T00:00:00Z"),
    expect={
        ("week", "2024-W13"): {"active_users": 1, "population": pop(active=1)},
        # end Apr 8 00:00: u1 7d+1ms ago, u2 exactly 7d ago: both sleeping
        ("week", "2024-W14"): {"active_users": 1, "population": pop(sleeping=2)},
        ("month", "2024-03"): {"active_users": 1, "population": pop(active=1)},
        ("quarter", "2024-Q1"): {"active_users": 1, "population": pop(active=1)},
        ("day", "2024-04-01"): {"active_users": 1, "population": pop(active=2)},
    },
))

ev = events_factory()
CASES.append(Case(
    # a: gap 2d -> active; b: 2d+1ms -> silent; c: 4d -> silent; d: 4d+1ms -> sleeping;
    # e: 8d -> sleeping; f: 8d+1ms -> churned; g: 16d -> churned; h: 16d+1ms -> dead.
    id="population-ladder-at-day-end",
    events=sorted(
        [ev(u, "login", ms("2024-01-21T00:00:00Z") - gap) for u, gap in (
            ("a", SILENT), ("b", SILENT + 1), ("c", SLEEPING), ("d", SLEEPING + 1),
            ("e", CHURNED), ("f", CHURNED + 1), ("g", DEAD), ("h", DEAD + 1))],
        key=lambda e: e["ts"]),
    until=ms("2024-01-21T00:00:00Z"),
    expect={("day", "2024-01-20"): {"active_users": 0,
                                    "population": pop(active=1, silent=2, sleeping=2, churned=2, dead=1)}},
))

# --------------------------------------------------------------------------- #
# ISO weeks across a year end: 2020-12-28 .. 2021-01-03 is 2020-W53

ev = events_factory()
CASES.append(Case(
    id="iso-week-2020-W53",
    events=[ev("u1", "signup", "2020-12-31T12:00:00Z"), ev("u2", "signup", "2021-01-03T23:59:59.999Z"),
            ev("u3", "signup", "2021-01-04T00:00:00Z")],
    until=ms("2021-01-11T00:00:00Z"),
    expect={
        ("week", "2020-W53"): {"new_users": 2, "active_users": 2, "population": pop(active=1, silent=1)},
        ("week", "2021-W01"): {"new_users": 1, "active_users": 1, "population": pop(sleeping=2, churned=1)},
        ("month", "2020-12"): {"new_users": 1, "population": pop(active=1)},
        ("quarter", "2020-Q4"): {"new_users": 1},
        ("year", "2020"): {"new_users": 1, "active_users": 1, "population": pop(active=1)},
        ("day", "2021-01-04"): {"new_users": 1},
    },
    absent=(("week", "2021-W53"), ("week", "2020-W52"), ("year", "2021")),
))

# --------------------------------------------------------------------------- #
# America/New_York across DST: 2024-03-10 has 23 hours, 2024-11-03 has 25.

ev = events_factory()
CASES.append(Case(
    # u5 at local midnight Mar 9 (05:00Z): silent 48h later = 05:00Z Mar 11 = 01:00 EDT Mar 11.
    id="dst-spring-forward-new-york",
    settings={"timezone": "America/New_York"},
    events=[
        ev("u5", "login", "2024-03-09T00:00:00-05:00"),
        ev("u1", "login", "2024-03-09T23:59:59.999-05:00"),
        ev("u2", "login", "2024-03-10T00:00:00-05:00"),
        ev("u3", "login", "2024-03-10T23:59:59.999-04:00"),
        ev("u4", "login", "2024-03-11T00:00:00-04:00"),
    ],
    until=ms("2024-03-14T00:00:00-04:00"),
    expect={
        ("day", "2024-03-09"): {"active_users": 2, "population": pop(active=2)},
        # end = 04:00Z Mar 11: u5's gap is 47h -> still active
        ("day", "2024-03-10"): {"active_users": 2, "entered_silent": 0, "population": pop(active=4)},
        ("day", "2024-03-11"): {"active_users": 1, "entered_silent": 1, "population": pop(active=4, silent=1)},
        # u1 (04:59:59.999Z), u2 (05:00Z) on Mar 12, u3 at 03:59:59.999Z Mar 13 = 23:59:59.999 EDT Mar 12
        ("day", "2024-03-12"): {"entered_silent": 3},
        ("day", "2024-03-13"): {"entered_silent": 1},
        ("week", "2024-W10"): {"active_users": 4, "population": pop(active=4)},
    },
    absent=(("day", "2024-03-08"),),
))

ev = events_factory()
CASES.append(Case(
    # u5 at local midnight Nov 2 (04:00Z): silent at 04:00Z Nov 4 = 23:00 EST Nov 3.
    id="dst-fall-back-new-york",
    settings={"timezone": "America/New_York"},
    events=[
        ev("u5", "login", "2024-11-02T00:00:00-04:00"),
        ev("u1", "login", "2024-11-03T00:00:00-04:00"),
        ev("u2", "login", "2024-11-03T01:30:00-04:00"),
        ev("u3", "login", "2024-11-03T01:30:00-05:00"),
        ev("u4", "login", "2024-11-03T23:59:59.999-05:00"),
        ev("u6", "login", "2024-11-04T00:00:00-05:00"),
    ],
    until=ms("2024-11-07T00:00:00-05:00"),
    expect={
        ("day", "2024-11-02"): {"active_users": 1, "population": pop(active=1)},
        ("day", "2024-11-03"): {"active_users": 4, "entered_silent": 1, "population": pop(active=4, silent=1)},
        # u1 silent at 04:00Z Nov 5 = 23:00 EST Nov 4; u2 at 05:30Z Nov 5 = 00:30 EST Nov 5
        # end 05:00Z Nov 5: u5 73h and u1 49h ago are silent; u2 47.5h ago is active
        ("day", "2024-11-04"): {"active_users": 1, "entered_silent": 1, "population": pop(active=4, silent=2)},
        ("day", "2024-11-05"): {"entered_silent": 3},
    },
    absent=(("day", "2024-11-01"),),
))

# --------------------------------------------------------------------------- #
# several events at the same instant

T = ms("2024-01-10T12:00:00Z")
ev = events_factory()
CASES.append(Case(
    id="same-user-same-ms-signup-purchase-login",
    events=[ev("u1", "signup", T, channel="organic"), ev("u1", "purchase", T, amount="5.00"),
            ev("u1", "login", T)],
    until=ms("2024-01-20T00:00:00Z"),
    expect={
        ("day", "2024-01-10"): {"new_users": 1, "active_users": 1, "orders": 1, "paying_users": 1,
                                "revenue": "5.00", "new_users_by_channel": {"organic": 1}},
        ("day", "2024-01-12"): {"entered_silent": 1},  # one activity instant: one entry
        ("day", "2024-01-14"): {"entered_sleeping": 1},
    },
))

ev = events_factory()
CASES.append(Case(
    id="same-user-two-purchases-same-ms",
    events=[ev("u1", "purchase", T, amount="1.50"), ev("u1", "purchase", T, amount="2.25"),
            ev("u2", "app_open", T)],  # an unknown type is plain activity
    until=ms("2024-01-11T00:00:00Z"),
    expect={("day", "2024-01-10"): {"active_users": 2, "orders": 2, "paying_users": 1, "revenue": "3.75",
                                    "new_users": 0}},
))

ev = events_factory()
CASES.append(Case(
    id="repeated-instant-is-one-activity",
    # a1 = T, then T again (no gap), then T + 2d: the gap is exactly T_silent -> no entry
    events=[ev("u1", "login", T), ev("u1", "page_view", T), ev("u1", "login", T + SILENT)],
    until=ms("2024-01-13T00:00:00Z"),
    expect={("day", "2024-01-12"): {"entered_silent": 0, "active_users": 1},
            ("day", "2024-01-10"): {"active_users": 1}},
))

# --------------------------------------------------------------------------- #
# duplicates are counted once

ev = events_factory()
p1 = ev("u1", "purchase", T, amount="5.00", event_id="p1")
p2 = ev("u1", "purchase", T + HOUR, amount="3.00", event_id="p2")
s1 = ev("u2", "signup", T + HOUR, channel="email", event_id="s1")
CASES.append(Case(
    id="duplicates-counted-once",
    events=[p1, dict(p1), s1, p2, dict(p1), dict(s1),
            dict(p2, amount="7.00")],  # same id, other payload: the first one counts
    until=ms("2024-01-11T00:00:00Z"),
    expect={("day", "2024-01-10"): {"orders": 2, "revenue": "8.00", "paying_users": 1, "new_users": 1,
                                    "active_users": 2, "new_users_by_channel": {"email": 1}}},
    totals={"accepted": 3, "duplicates": 4, "late": 0},
))

# --------------------------------------------------------------------------- #
# late events change nothing (one partition: the watermark is per partition)

ev = events_factory()
LATE_EVENTS = [
    ev("u1", "login", T),
    ev("u2", "login", T + 5 * HOUR),  # watermark -> T + 4h
    ev("u3", "purchase", T + 4 * HOUR - 1, amount="9.99", event_id="late1"),  # late
    ev("u4", "signup", T + 4 * HOUR),  # exactly at the watermark: accepted
    ev("u1", "purchase", T + HOUR, amount="1.00", event_id="late2"),  # late
]
CASES.append(Case(
    id="late-events-are-refused",
    events=LATE_EVENTS,
    until=ms("2024-01-11T00:00:00Z"),
    partitions=(1,),
    expect={("day", "2024-01-10"): {"active_users": 3, "orders": 0, "revenue": "0.00", "new_users": 1,
                                    "population": pop(active=3)}},
    totals={"accepted": 3, "late": 2, "duplicates": 0},
))

# --------------------------------------------------------------------------- #
# money is exact

ev = events_factory()
CASES.append(Case(
    id="revenue-0.10+0.20",
    events=[ev("u1", "purchase", T, amount="0.10"), ev("u1", "purchase", T + 1, amount="0.20")],
    until=ms("2024-01-11T00:00:00Z"),
    expect={("day", "2024-01-10"): {"revenue": "0.30", "orders": 2, "refunds": "0.00"}},
))
ev = events_factory()
CASES.append(Case(
    id="revenue-json-number-literals",
    events=[ev("u1", "purchase", T, amount=0.1), ev("u1", "purchase", T + 1, amount=0.2),
            ev("u2", "purchase", T + 2, amount=19.99), ev("u2", "purchase", T + 3, amount="0.01")],
    until=ms("2024-01-11T00:00:00Z"),
    expect={("day", "2024-01-10"): {"revenue": "20.30", "orders": 4, "paying_users": 2}},
))
ev = events_factory()
CASES.append(Case(
    id="refunds-make-revenue-negative",
    events=[ev("u1", "purchase", T, amount="0.30"), ev("u1", "refund", T + 1, amount="1.00"),
            ev("u2", "refund", T + 2, amount="0.05")],
    until=ms("2024-01-11T00:00:00Z"),
    expect={("day", "2024-01-10"): {"revenue": "-0.75", "refunds": "1.05", "orders": 1, "paying_users": 1}},
    absent=(("week", "2024-W02"), ("month", "2024-01")),  # not closed yet
))

# --------------------------------------------------------------------------- #
# channels and referrals

ev = events_factory()
CASES.append(Case(
    id="channels-allow-list",
    events=[
        ev("u1", "signup", T, channel="organic"),
        ev("u2", "signup", T + 1, channel="tiktok"),  # not in the allow-list
        ev("u3", "signup", T + 2),  # missing
        ev("u4", "signup", T + 3, channel="Organic"),  # case matters
        ev("u5", "signup", T + 4, channel="paid_search", referrer_id="u1"),
        ev("u1", "signup", T + 5, channel="email", referrer_id="u9"),  # second signup: ignored
    ],
    until=ms("2024-01-11T00:00:00Z"),
    expect={("day", "2024-01-10"): {
        "new_users": 5, "referred_signups": 1,
        "new_users_by_channel": {"organic": 1, "other": 2, "paid_search": 1, "unknown": 1}}},
))

ev = events_factory()
CASES.append(Case(
    id="signup-after-first-activity",
    events=[ev("u1", "login", "2024-01-05T12:00:00Z"), ev("u1", "signup", "2024-01-06T12:00:00Z"),
            ev("u1", "signup", "2024-01-07T12:00:00Z", channel="organic")],
    until=ms("2024-01-08T00:00:00Z"),
    expect={("day", "2024-01-05"): {"new_users": 0, "active_users": 1},
            ("day", "2024-01-06"): {"new_users": 1, "new_users_by_channel": {"unknown": 1}},
            ("day", "2024-01-07"): {"new_users": 0, "new_users_by_channel": {}}},
))

ev = events_factory()
CASES.append(Case(
    id="warning-state-churned",
    settings={"lifecycle": {"warning_state": "churned"}},
    events=[ev("u1", "login", "2024-01-01T12:00:00Z")],
    until=ms("2024-01-12T00:00:00Z"),
    expect={("day", "2024-01-05"): {"entered_sleeping": 1, "churn_warnings": 0},
            ("day", "2024-01-09"): {"entered_churned": 1, "churned": 1, "churn_warnings": 1}},
))

# --------------------------------------------------------------------------- #
# distinct users of a month when the ISO week started in the previous month
# (2024-W05 is Mon 2024-01-29 .. Sun 2024-02-04; 2025-W01 starts Mon 2024-12-30).
# Regression: before commit 11c2343 the engine stopped counting a returning
# user at the first grain whose period had already seen them, so the month
# (and quarter/year) after a straddling week lost the user.

ev = events_factory()
CASES.append(Case(
    id="month-distinct-users-week-straddles-month",
    events=[ev("u1", "purchase", "2024-01-30T10:00:00Z", amount="1.00"),
            ev("u1", "purchase", "2024-02-02T10:00:00Z", amount="2.00")],
    until=ms("2024-03-01T00:00:00Z"),
    expect={("month", "2024-01"): {"active_users": 1, "paying_users": 1, "orders": 1},
            ("month", "2024-02"): {"active_users": 1, "paying_users": 1, "orders": 1, "revenue": "2.00"},
            ("week", "2024-W05"): {"active_users": 1, "paying_users": 1, "orders": 2}},
))

ev = events_factory()
CASES.append(Case(
    id="quarter-distinct-users-week-straddles-year",
    events=[ev("u1", "purchase", "2024-12-31T10:00:00Z", amount="1.00"),
            ev("u1", "purchase", "2025-01-02T10:00:00Z", amount="2.00")],
    until=ms("2025-04-01T00:00:00Z"),
    expect={("year", "2024"): {"active_users": 1, "paying_users": 1},
            ("month", "2025-01"): {"active_users": 1, "paying_users": 1},
            ("quarter", "2025-Q1"): {"active_users": 1, "paying_users": 1, "orders": 1},
            ("week", "2025-W01"): {"active_users": 1, "paying_users": 1, "orders": 2}},
))


# --------------------------------------------------------------------------- #


def _impls(case: Case) -> list[str]:
    return ["reference"] + [f"pipeline-{n}p" for n in case.partitions]


# --------------------------------------------------------------------------- #
# growth accounting: new / retained / resurrected / dormant per grain, and the quick ratio


def growth(new: int, retained: int, resurrected: int, dormant: int, quick_ratio: str | None) -> dict[str, Any]:
    return {"new": new, "retained": retained, "resurrected": resurrected, "dormant": dormant,
            "quick_ratio": quick_ratio}


ev = events_factory()
CASES.append(Case(
    # Jan 10: u1, u2, u3 new.  Jan 11: u1 again (retained), u4 new; u2, u3 dormant.  Jan 12: u3 back (resurrected:
    # active Jan 10, not Jan 11), u4 again (retained); u1 dormant.  Jan 13: nobody (u3, u4 dormant).
    id="growth-accounting-by-day",
    events=[ev("u1", "login", "2024-01-10T08:00:00Z"), ev("u2", "login", "2024-01-10T09:00:00Z"),
            ev("u3", "login", "2024-01-10T23:59:59.999Z"), ev("u1", "login", "2024-01-11T00:00:00Z"),
            ev("u4", "signup", "2024-01-11T12:00:00Z"), ev("u3", "purchase", "2024-01-12T10:00:00Z", amount="5"),
            ev("u4", "login", "2024-01-12T11:00:00Z")],
    until=ms("2024-01-15T00:00:00Z"),
    expect={
        ("day", "2024-01-10"): {"active_users": 3, "growth": growth(3, 0, 0, 0, None)},  # nobody dormant: no ratio
        ("day", "2024-01-11"): {"active_users": 2, "growth": growth(1, 1, 0, 2, "0.5000")},
        ("day", "2024-01-12"): {"active_users": 2, "growth": growth(0, 1, 1, 1, "1.0000")},
        ("day", "2024-01-13"): {"active_users": 0, "growth": growth(0, 0, 0, 2, "0.0000")},
        ("week", "2024-W02"): {"active_users": 4, "growth": growth(4, 0, 0, 0, None)},
    },
))

ev = events_factory()
CASES.append(Case(
    # An ISO week that straddles two months: u1 active Tue Jan 30 and Fri Feb 2 is retained in February (active
    # in January too) and in nothing else of week 5; u2 active Jan 2 and Feb 1 is resurrected in week 5 (not
    # active in week 4) but retained in February.  u3, active in January only, is dormant in February.
    id="growth-accounting-week-straddles-month",
    events=[ev("u2", "login", "2024-01-02T10:00:00Z"), ev("u3", "login", "2024-01-03T10:00:00Z"),
            ev("u1", "login", "2024-01-30T10:00:00Z"),
            ev("u2", "login", "2024-02-01T10:00:00Z"), ev("u1", "login", "2024-02-02T10:00:00Z")],
    until=ms("2024-03-01T00:00:00Z"),
    expect={
        ("month", "2024-01"): {"active_users": 3, "growth": growth(3, 0, 0, 0, None)},
        ("month", "2024-02"): {"active_users": 2, "growth": growth(0, 2, 0, 1, "0.0000")},
        ("week", "2024-W05"): {"active_users": 2, "growth": growth(1, 0, 1, 0, None)},
        ("week", "2024-W06"): {"active_users": 0, "growth": growth(0, 0, 0, 2, "0.0000")},
    },
))

ev = events_factory()
CASES.append(Case(
    # Calendar days in the configured timezone, across the DST change (2024-03-10 in New York: a 23-hour day).
    # u1 at 23:59 local on Mar 9 (04:59Z Mar 10) and 00:01 local Mar 10 (05:01Z): retained on Mar 10.  u2 at
    # 23:30 local Mar 10 (03:30Z Mar 11, after the change) and Mar 12: new on Mar 10, dormant Mar 11, resurrected
    # on Mar 12.
    id="growth-accounting-local-days-across-dst",
    settings={"timezone": "America/New_York"},
    events=[ev("u1", "login", "2024-03-10T04:59:00Z"), ev("u1", "login", "2024-03-10T05:01:00Z"),
            ev("u2", "login", "2024-03-11T03:30:00Z"), ev("u2", "login", "2024-03-12T16:00:00Z")],
    until=ms("2024-03-14T04:00:00Z"),
    expect={
        ("day", "2024-03-09"): {"active_users": 1, "growth": growth(1, 0, 0, 0, None)},
        ("day", "2024-03-10"): {"active_users": 2, "growth": growth(1, 1, 0, 0, None)},
        ("day", "2024-03-11"): {"active_users": 0, "growth": growth(0, 0, 0, 2, "0.0000")},
        ("day", "2024-03-12"): {"active_users": 1, "growth": growth(0, 0, 1, 0, None)},
    },
))

# N-day retention and signup cohorts


def ret(eligible: int, retained: int, rate: str | None) -> dict[str, Any]:
    return {"eligible": eligible, "retained": retained, "rate": rate}


ev = events_factory()
CASES.append(Case(
    # u1 signs up Mon Jan 1: its day 1 is Jan 2 (active: retained), its day 7 Jan 8, with activity on Jan 7 and
    # Jan 9 only (day N-1 and N+1: not retained).  u2 signs up at 23:59 on Jan 24 and again on Jan 25 (the first
    # signup counts): day 1 is Jan 25 (active: the second signup), day 7 is Jan 31, the last day of January,
    # active at its last millisecond.  u3 signs up at the first instant of Jan 25 and is never seen again: day 7
    # is Feb 1.  Cohorts (horizon 2): the users of each signup week / month active in each later one.
    id="retention-and-cohorts",
    settings={"retention": {"days": [1, 7], "cohort_horizon": 2}},
    events=[ev("u1", "signup", "2024-01-01T10:00:00Z", channel="organic"), ev("u1", "login", "2024-01-02T10:00:00Z"),
            ev("u1", "login", "2024-01-07T10:00:00Z"), ev("u1", "login", "2024-01-09T10:00:00Z"),
            ev("u2", "signup", "2024-01-24T23:59:00Z"), ev("u3", "signup", "2024-01-25T00:00:00Z"),
            ev("u2", "signup", "2024-01-25T10:00:00Z"), ev("u2", "login", "2024-01-31T23:59:59.999Z"),
            ev("u1", "login", "2024-02-10T10:00:00Z")],
    until=ms("2024-03-01T00:00:00Z"),
    expect={
        ("day", "2024-01-02"): {"retention": {"d1": ret(1, 1, "1.0000"), "d7": ret(0, 0, None)}},  # no value
        ("day", "2024-01-08"): {"retention": {"d1": ret(0, 0, None), "d7": ret(1, 0, "0.0000")}},
        ("day", "2024-01-25"): {"retention": {"d1": ret(1, 1, "1.0000"), "d7": ret(0, 0, None)}},
        ("day", "2024-01-26"): {"retention": {"d1": ret(1, 0, "0.0000"), "d7": ret(0, 0, None)}},
        ("day", "2024-01-31"): {"retention": {"d1": ret(0, 0, None), "d7": ret(1, 1, "1.0000")}},
        ("week", "2024-W01"): {"retention": {"d1": ret(1, 1, "1.0000"), "d7": ret(0, 0, None)},
                               "cohorts": {"2023-W51": 0, "2023-W52": 0, "2024-W01": 1}},
        ("week", "2024-W02"): {"cohorts": {"2023-W52": 0, "2024-W01": 1, "2024-W02": 0}},
        ("week", "2024-W04"): {"cohorts": {"2024-W02": 0, "2024-W03": 0, "2024-W04": 2}},
        ("week", "2024-W05"): {"retention": {"d1": ret(0, 0, None), "d7": ret(2, 1, "0.5000")},
                               "cohorts": {"2024-W03": 0, "2024-W04": 1, "2024-W05": 0}},
        ("week", "2024-W06"): {"cohorts": {"2024-W04": 0, "2024-W05": 0, "2024-W06": 0}},  # u1: beyond the horizon
        ("month", "2024-01"): {"retention": {"d1": ret(3, 2, "0.6667"), "d7": ret(2, 1, "0.5000")},
                               "cohorts": {"2023-11": 0, "2023-12": 0, "2024-01": 3}, "new_users": 3},
        ("month", "2024-02"): {"retention": {"d1": ret(0, 0, None), "d7": ret(1, 0, "0.0000")},
                               "cohorts": {"2023-12": 0, "2024-01": 1, "2024-02": 0}},
    },
))

ev = events_factory()
CASES.append(Case(
    # Calendar days in New York across the DST change (Mar 10 2024 has 23 hours).  u1 signs up at 23:59 local on
    # Mar 9 and is active at 23:30 local on Mar 10 (after the change): retained on day 1.  u2 signs up at 00:00
    # local Mar 10 and is active at 23:59:59 local the same day only: not retained.  u3 signs up at 23:30 local on
    # Feb 29 (Mar 1 in UTC): its cohort is February, active in March.
    id="retention-and-cohorts-local-days-across-dst",
    settings={"timezone": "America/New_York", "retention": {"days": [1], "cohort_horizon": 2}},
    events=[ev("u3", "signup", "2024-03-01T04:30:00Z"), ev("u3", "login", "2024-03-05T15:00:00Z"),
            ev("u1", "signup", "2024-03-10T04:59:00Z"), ev("u2", "signup", "2024-03-10T05:00:00Z"),
            ev("u1", "login", "2024-03-11T03:30:00Z"), ev("u2", "login", "2024-03-11T03:59:59Z")],
    until=ms("2024-04-01T04:00:00Z"),
    expect={
        ("day", "2024-03-01"): {"retention": {"d1": ret(1, 0, "0.0000")}},
        ("day", "2024-03-10"): {"retention": {"d1": ret(1, 1, "1.0000")}},
        ("day", "2024-03-11"): {"retention": {"d1": ret(1, 0, "0.0000")}},
        ("month", "2024-02"): {"cohorts": {"2023-12": 0, "2024-01": 0, "2024-02": 1}, "new_users": 1},
        ("month", "2024-03"): {"retention": {"d1": ret(3, 1, "0.3333")},
                               "cohorts": {"2024-01": 0, "2024-02": 1, "2024-03": 2}},
    },
))

# first purchases and activation within a window


def act(eligible: int, converted: int, rate: str | None) -> dict[str, Any]:
    return {"eligible": eligible, "converted": converted, "rate": rate}


ev = events_factory()
CASES.append(Case(
    # Window 7 days: a signup on day d is eligible on day d + 7, converted by a purchase on days d .. d + 6.
    # u1 purchases at 08:00 and signs up at 09:00 on Jan 1: converted (same day).  u2 signs up Jan 2 and first
    # purchases on Jan 9, its day 7: too late.  u3 signs up at 23:59 on Jan 3, purchases at 23:59 on Jan 9 (day
    # 6) and again on Jan 10: converted once.  u4 signs up twice (Jan 4 counts) and never purchases.  u5 never
    # signs up: a first purchase, outside activation.
    id="first-purchases-and-activation",
    settings={"activation": {"window_days": 7}},
    events=[ev("u1", "purchase", "2024-01-01T08:00:00Z", amount="5"), ev("u1", "signup", "2024-01-01T09:00:00Z"),
            ev("u2", "signup", "2024-01-02T10:00:00Z"), ev("u3", "signup", "2024-01-03T23:59:00Z"),
            ev("u4", "signup", "2024-01-04T12:00:00Z"), ev("u4", "signup", "2024-01-05T12:00:00Z"),
            ev("u5", "purchase", "2024-01-05T13:00:00Z", amount="1"),
            ev("u2", "purchase", "2024-01-09T09:00:00Z", amount="2"),
            ev("u3", "purchase", "2024-01-09T23:59:00Z", amount="3"),
            ev("u3", "purchase", "2024-01-10T10:00:00Z", amount="4")],
    until=ms("2024-02-01T00:00:00Z"),
    expect={
        ("day", "2024-01-01"): {"first_purchases": 1, "activation": act(0, 0, None)},  # nobody eligible: no value
        ("day", "2024-01-05"): {"first_purchases": 1},
        ("day", "2024-01-08"): {"first_purchases": 0, "activation": act(1, 1, "1.0000")},
        ("day", "2024-01-09"): {"first_purchases": 2, "activation": act(1, 0, "0.0000")},
        ("day", "2024-01-10"): {"first_purchases": 0, "activation": act(1, 1, "1.0000")},
        ("day", "2024-01-11"): {"activation": act(1, 0, "0.0000")},
        ("week", "2024-W01"): {"first_purchases": 2, "activation": act(0, 0, None)},
        ("week", "2024-W02"): {"first_purchases": 2, "activation": act(4, 2, "0.5000")},
        ("month", "2024-01"): {"first_purchases": 4, "activation": act(4, 2, "0.5000"), "new_users": 4},
    },
))

# referral value: referred revenue and inviters

ev = events_factory()
CASES.append(Case(
    # u1 signs up with a referrer and purchases at the same instant (counted), then is refunded.  u2 purchases
    # before its referred signup (not counted) and after it (counted).  u3's first signup has no referrer, its
    # second has one: not referred.  u1 invites twice on Jan 1 and again on Jan 8, u3 on Jan 2.
    id="referred-revenue-and-inviters",
    events=[ev("u1", "signup", "2024-01-01T08:00:00Z", referrer_id="r"),
            ev("u1", "purchase", "2024-01-01T08:00:00Z", amount="10.00"),
            ev("u2", "purchase", "2024-01-01T08:30:00Z", amount="5.00"),
            ev("u2", "signup", "2024-01-01T09:00:00Z", referrer_id="u1"),
            ev("u3", "signup", "2024-01-01T09:30:00Z"),
            ev("u1", "invite", "2024-01-01T10:00:00Z"), ev("u1", "invite", "2024-01-01T11:00:00Z"),
            ev("u1", "refund", "2024-01-02T08:00:00Z", amount="3.00"),
            ev("u3", "signup", "2024-01-02T09:00:00Z", referrer_id="u1"),
            ev("u3", "purchase", "2024-01-02T10:00:00Z", amount="4.00"),
            ev("u3", "invite", "2024-01-02T11:00:00Z"),
            ev("u2", "purchase", "2024-01-03T10:00:00Z", amount="7.00"),
            ev("u1", "invite", "2024-01-08T10:00:00Z")],
    until=ms("2024-02-01T00:00:00Z"),
    expect={
        ("day", "2024-01-01"): {"referred_revenue": "10.00", "inviters": 1, "invites": 2, "revenue": "15.00"},
        ("day", "2024-01-02"): {"referred_revenue": "-3.00", "inviters": 1},
        ("day", "2024-01-03"): {"referred_revenue": "7.00", "inviters": 0},
        ("week", "2024-W01"): {"referred_revenue": "14.00", "inviters": 2, "invites": 3},
        ("week", "2024-W02"): {"referred_revenue": "0.00", "inviters": 1, "invites": 1},
        ("month", "2024-01"): {"referred_revenue": "14.00", "inviters": 2, "invites": 4, "referred_signups": 2},
    },
))

PARAMS = [pytest.param(case, impl, id=f"{case.id}|{impl}") for case in CASES for impl in _impls(case)]


def _report(case: Case, impl: str) -> dict:
    settings = settings_factory(**case.settings)
    if impl == "reference":
        return reference_report(case.events, settings, case.until)
    n = int(impl.removeprefix("pipeline-").removesuffix("p"))
    return run_pipeline(to_lines(case.events), settings, n, case.until)


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_boundary_case(case: Case, impl: str) -> None:
    report = _report(case, impl)
    wrong = {}
    for key, fields in case.expect.items():
        assert key in report, f"{key} not reported; reported: {sorted(report)}"
        for name, want in fields.items():
            got = report[key][name]
            if got != want:
                wrong[f"{key[0]} {key[1]} {name}"] = {"want": want, "got": got}
    assert not wrong, wrong
    for key in case.absent:
        assert key not in report, f"{key} should not be reported: {report[key]}"
    if impl != "reference":
        for name, want in case.totals.items():
            assert report.totals[name] == want, (name, report.totals)


def test_late_events_change_nothing() -> None:
    settings = settings_factory()
    until = ms("2024-01-11T00:00:00Z")
    with_late = run_pipeline(to_lines(LATE_EVENTS), settings, 1, until)
    without = run_pipeline(to_lines([e for e in LATE_EVENTS if not e["event_id"].startswith("late")]),
                           settings, 1, until)
    assert dict(with_late) == dict(without)
    assert with_late.late_offsets == {0: [2, 4]}
    assert with_late.totals["late"] == 2 and without.totals["late"] == 0
    assert reference_report(LATE_EVENTS, settings, until, partition_of=partitioner(1)) == dict(without)


def test_dst_day_lengths_new_york() -> None:
    """The calendar the cases above rely on: a 23 h and a 25 h local day."""
    from kpimon.agents.core.periods import Calendar

    cal = Calendar("America/New_York")
    spring, fall = cal.parse("day", "2024-03-10"), cal.parse("day", "2024-11-03")
    assert spring.end_ms - spring.start_ms == 23 * HOUR
    assert fall.end_ms - fall.start_ms == 25 * HOUR
    assert spring.start_ms == ms("2024-03-10T00:00:00-05:00") and spring.end_ms == ms("2024-03-11T00:00:00-04:00")


# --------------------------------------------------------------------------- #
# the engine's decision on each offered event (lateness 1h)

BASE = ms("2024-01-10T12:00:00Z")


@pytest.mark.parametrize(("ts", "event_id", "want"), [
    pytest.param(BASE - HOUR, "x", ACCEPTED, id="exactly-at-watermark-accepted"),
    pytest.param(BASE - HOUR - 1, "x", LATE, id="1ms-below-watermark-late"),
    pytest.param(BASE + DAY, "x", ACCEPTED, id="ahead-accepted"),
    pytest.param(BASE, "first", DUPLICATE, id="same-event-id-duplicate"),
    pytest.param(BASE - 2 * HOUR, "first", DUPLICATE, id="duplicate-wins-over-late"),
])
def test_offer_decision(ts: int, event_id: str, want: int) -> None:
    engine = PartitionEngine(EngineConfig.from_settings(settings_factory()))
    dec = Decoder()
    first = dec.decode(b'{"event_id":"first","user_id":"u1","type":"login","ts":%d}' % BASE)
    assert engine.offer(first) == ACCEPTED
    assert engine.wm == BASE - HOUR
    ev = dec.decode(b'{"event_id":"%s","user_id":"u2","type":"login","ts":%d}' % (event_id.encode(), ts))
    assert engine.offer(ev) == want
    t = engine.totals
    assert (t.accepted, t.duplicates, t.late) == (1 + (want == ACCEPTED), int(want == DUPLICATE), int(want == LATE))
