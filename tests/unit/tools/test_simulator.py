"""Tests for agents.tools.simulator and agents.tools.datasets: determinism, event mix, lifecycle, bad lines, speed."""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from decimal import Decimal

import orjson
import pytest

from kpimon.agents.core.engine import ACCEPTED, DUPLICATE, EngineConfig, PartitionEngine
from kpimon.agents.core.lifecycle import ACTIVE, CHURNED, DEAD, SILENT, SLEEPING
from kpimon.agents.tools.datasets import (
    BAD_KINDS,
    DEFAULT_START_MS,
    MAX_DISORDER_MS,
    bad_line,
    default_users,
    generate,
    write_dataset,
)
from kpimon.agents.tools.simulator import DAY_MS, Simulator, time_scale_for
from kpimon.config.settings import load
from kpimon.streams.admin import read_lines
from kpimon.streams.events import Decoder, Rejected

AMOUNT = re.compile(r"^[0-9]+\.[0-9]{2}$")
TYPES = {"signup", "purchase", "refund", "invite", "login", "page_view", "session_start", "app_open"}


@pytest.fixture(scope="module")
def history() -> list[bytes]:
    """A clean history of 100k lines (about four months with the default user base)."""
    return list(generate(100_000, DEFAULT_START_MS, seed=11))


@pytest.fixture(scope="module")
def objects(history: list[bytes]) -> list[dict]:
    return [orjson.loads(line) for line in history]


# ------------------------------------------------------------------ determinism
def test_events_between_is_deterministic_for_a_seed() -> None:
    t0 = 1_700_000_000_000
    a = Simulator(seed=5, users=500).events_between(t0, t0 + 20 * DAY_MS)
    b = Simulator(seed=5, users=500).events_between(t0, t0 + 20 * DAY_MS)
    c = Simulator(seed=6, users=500).events_between(t0, t0 + 20 * DAY_MS)
    assert a and a == b
    assert a != c


def test_events_between_does_not_depend_on_chunking() -> None:
    t0 = 1_700_000_000_000
    whole = Simulator(seed=3, users=300, time_scale=1000.0, warmup_days=30).events_between(t0, t0 + 3_600_000)
    sim = Simulator(seed=3, users=300, time_scale=1000.0, warmup_days=30)
    parts: list[dict] = []
    rng = random.Random(1)
    t = t0
    while t < t0 + 3_600_000:
        step = min(rng.randint(1, 120_000), t0 + 3_600_000 - t)
        got = sim.events_between(t, t + step)
        assert all(t <= _ts(e) < t + step for e in got)
        parts.extend(got)
        t += step
    assert parts == whole
    assert len(whole) > 1000


def test_events_between_is_sorted_with_unique_ids() -> None:
    sim = Simulator(seed=9, users=1000, time_scale=50_000.0, warmup_days=60)
    t0 = 1_800_000_000_000
    evs = [e for k in range(20) for e in sim.events_between(t0 + k * 500, t0 + (k + 1) * 500)]
    ts = [_ts(e) for e in evs]
    assert ts == sorted(ts)
    assert len({e["event_id"] for e in evs}) == len(evs)
    assert all(re.fullmatch(r"9-[0-9]+", e["event_id"]) for e in evs)


def test_generate_is_deterministic() -> None:
    a = list(generate(20_000, DEFAULT_START_MS, seed=2, bad_ratio=0.01, duplicate_ratio=0.01))
    b = list(generate(20_000, DEFAULT_START_MS, seed=2, bad_ratio=0.01, duplicate_ratio=0.01))
    c = list(generate(20_000, DEFAULT_START_MS, seed=3, bad_ratio=0.01, duplicate_ratio=0.01))
    assert len(a) == 20_000
    assert a == b
    assert a != c


def test_time_scale_for_gives_the_rate() -> None:
    rate, users = 300.0, 300
    scale = time_scale_for(rate, users, seed=0, warmup_days=120)
    sim = Simulator(seed=0, users=users, time_scale=scale, warmup_days=120)
    t0 = 1_800_000_000_000
    n = len(sim.events_between(t0, t0 + 20_000))
    assert 0.5 * rate * 20 < n < 1.5 * rate * 20


@pytest.mark.parametrize("n,users", [(40_000, 1500), (3000, 200), (100_000, 100)])
def test_history_spans_months_whatever_the_user_base(n: int, users: int) -> None:
    dec = Decoder()
    ts = [dec.decode(line).ts for line in generate(n, DEFAULT_START_MS, seed=1, users=users)]
    assert 120 < (max(ts) - min(ts)) / DAY_MS < 300


# ------------------------------------------------------------------ event mix
def test_lines_are_valid_events_in_ts_order(history: list[bytes]) -> None:
    dec = Decoder()
    events = [dec.decode(line) for line in history]  # raises on any invalid line
    assert len({e.event_id for e in events}) == len(events)
    running = events[0].ts
    late_lines = 0
    for e in events:
        assert e.ts >= running - MAX_DISORDER_MS, "disorder beyond the allowed delay"
        late_lines += e.ts < running
        running = max(running, e.ts)
    assert 0 < late_lines < 0.01 * len(events)
    span_days = (running - events[0].ts) / DAY_MS
    assert 60 < span_days < 365, span_days  # a multi-month history


def test_event_mix(objects: list[dict]) -> None:
    types = Counter(o["type"] for o in objects)
    assert set(types) == TYPES
    assert types["page_view"] > types["session_start"] > types["purchase"] > types["refund"]
    assert types["signup"] > 300
    # signups: channels, including one outside the allow-list and a few without any
    channels = Counter(o.get("channel") for o in objects if o["type"] == "signup")
    assert {"organic", "paid_search", "social", "email", "referral", "tiktok", None} <= set(channels)
    assert channels["organic"] > channels["tiktok"] > 0
    # ts formats of the contract: RFC 3339 in UTC, with an offset, epoch ms
    forms = Counter("ms" if isinstance(o["ts"], int) else "Z" if o["ts"].endswith("Z") else "offset"
                    for o in objects)
    assert forms["Z"] > forms["ms"] > 0 and forms["offset"] > 0


def test_amounts_and_refunds(objects: list[dict]) -> None:
    purchases: dict[str, tuple[str, Decimal]] = {}
    refunds = 0
    for o in objects:
        if o["type"] in ("purchase", "refund"):
            assert isinstance(o["amount"], str) and AMOUNT.match(o["amount"]), o
            assert Decimal(o["amount"]) > 0
        else:
            assert "amount" not in o
        if o["type"] == "purchase":
            purchases[o["event_id"]] = (o["user_id"], Decimal(o["amount"]))
        elif o["type"] == "refund":
            refunds += 1
            user, amount = purchases.pop(o["refund_of"])  # an earlier purchase, refunded once
            assert user == o["user_id"]
            assert Decimal(o["amount"]) <= amount
    amounts = [a for _, a in purchases.values()]
    assert 0.02 < refunds / (refunds + len(amounts)) < 0.2
    assert 10 < sum(amounts) / len(amounts) < 60
    assert any(str(a).endswith(".99") for a in amounts) and any(not str(a).endswith("9") for a in amounts)


def test_referrers_exist_and_invited_first(objects: list[dict]) -> None:
    seen: set[str] = set()
    invited: set[str] = set()
    referred = 0
    for o in objects:
        if o["type"] == "signup" and "referrer_id" in o:
            referred += 1
            assert o["referrer_id"] in seen
            assert o["referrer_id"] in invited
            assert o["channel"] == "referral"
        if o["type"] == "invite":
            invited.add(o["user_id"])
        seen.add(o["user_id"])
    signups = sum(1 for o in objects if o["type"] == "signup")
    assert 0.05 < referred / signups < 0.3


def test_signup_comes_first_for_new_users(objects: list[dict]) -> None:
    """A history from launch: a user's first line is the signup (a few first-session
    lines overtake it through the simulated delivery delay)."""
    seen: set[str] = set()
    first: Counter = Counter()
    for o in objects:
        if o["user_id"] not in seen:
            seen.add(o["user_id"])
            first[o["type"]] += 1
    assert first["signup"] > 0.98 * sum(first.values())
    assert set(first) <= {"signup", "session_start", "app_open", "login", "page_view"}


# ------------------------------------------------------------------ lifecycle
def test_lifecycle_really_happens(objects: list[dict]) -> None:
    """Gaps above the default thresholds, with and without a later return."""
    settings = load()  # 7d / 14d / 30d / 90d
    th = settings.lifecycle
    dec = Decoder()
    last: dict[str, int] = {}
    gaps: list[int] = []
    for o in objects:
        ts = dec.decode(orjson.dumps(o)).ts
        prev = last.get(o["user_id"])
        if prev is not None and ts > prev:
            gaps.append(ts - prev)
        last[o["user_id"]] = max(ts, prev or ts)
    end = max(last.values())
    assert sum(th.silent_after < g <= th.sleeping_after for g in gaps) > 50
    assert sum(th.sleeping_after < g <= th.churned_after for g in gaps) > 10
    assert sum(th.churned_after < g <= th.dead_after for g in gaps) > 10  # won back from churned
    assert sum(g > th.dead_after for g in gaps) > 5  # won back from dead
    assert sum(end - t > th.dead_after for t in last.values()) > 100  # gone for good


def test_lifecycle_through_the_engine(history: list[bytes]) -> None:
    """The real engine sees every state entered and every kind of win-back."""
    settings = load()
    engine = PartitionEngine(EngineConfig.from_settings(settings))
    dec = Decoder()
    transitions: Counter = Counter()
    for i, line in enumerate(history):
        assert engine.offer(dec.decode(line)) == ACCEPTED
        if i % 5000 == 4999:
            engine.advance()
            transitions.update(engine.take_transitions())
    engine.advance(marker=engine.max_ts + 1)
    transitions.update(engine.take_transitions())
    for frm, to in ((ACTIVE, SILENT), (SILENT, SLEEPING), (SLEEPING, CHURNED), (CHURNED, DEAD)):
        assert transitions[(frm, to)] > 0, (frm, to)
    for frm in (SILENT, SLEEPING, CHURNED, DEAD):
        assert transitions[(frm, ACTIVE)] > 0, frm
    population = engine.population()
    assert all(n > 0 for n in population), population


# ------------------------------------------------------------------ bad lines, duplicates
@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_each_bad_kind_is_rejected_with_its_reason(kind: str) -> None:
    dec = Decoder()
    rng = random.Random(kind)
    for n in range(20):
        line = bad_line(rng, n, "u0000001", DEFAULT_START_MS, kind=kind)
        with pytest.raises(Rejected) as info:
            dec.decode(line)
        assert info.value.reason.value == BAD_KINDS[kind], (kind, line[:120], info.value)


def test_bad_and_duplicate_lines_in_a_history() -> None:
    n = 60_000
    lines = list(generate(n, DEFAULT_START_MS, seed=4, bad_ratio=0.03, duplicate_ratio=0.02))
    assert len(lines) == n
    dec = Decoder()
    engine = PartitionEngine(EngineConfig.from_settings(load()))
    reasons: Counter = Counter()
    status: Counter = Counter()
    for line in lines:
        try:
            ev = dec.decode(line)
        except Rejected as rej:
            reasons[rej.reason.value] += 1
            continue
        status[engine.offer(ev)] += 1
    assert set(reasons) == set(BAD_KINDS.values())
    assert 0.02 * n < sum(reasons.values()) < 0.04 * n
    assert reasons["too_large"] < reasons["not_json"]
    # duplicates are exact repeats of a recent valid line: the engine refuses them as such
    assert 0.01 * n < status[DUPLICATE] < 0.03 * n
    assert status[ACCEPTED] + status[DUPLICATE] == n - sum(reasons.values())
    counts = Counter(lines)
    assert sum(c - 1 for line, c in counts.items() if c > 1 and len(line) < 1000) >= status[DUPLICATE] * 0.9


def test_write_dataset(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    n = write_dataset(str(path), 25_000, seed=1, bad_ratio=0.01)
    lines = list(read_lines(str(path)))
    assert n == len(lines) == 25_000
    assert lines == list(generate(25_000, DEFAULT_START_MS, seed=1, bad_ratio=0.01))


# ------------------------------------------------------------------ speed
def test_generate_speed() -> None:
    n = 200_000
    start = time.perf_counter()
    count = sum(1 for _ in generate(n, DEFAULT_START_MS, seed=0, bad_ratio=0.005, duplicate_ratio=0.005))
    elapsed = time.perf_counter() - start
    assert count == n
    print(f"\ngenerate({n:,}): {elapsed:.2f}s, {n / elapsed:,.0f} lines/s (default users {default_users(n)})")


def _ts(e: dict) -> int:
    return Decoder().decode(orjson.dumps(e)).ts


def test_simulated_traffic_moves_every_user_operations_metric(history: list[bytes]) -> None:
    """The demo's traffic moves retention, cohorts, growth accounting, activation, first purchases and referral
    value (issue 10's numbers), under the packaged settings, through the worker's code path."""
    from tests.pure_pipeline import run_pipeline

    settings = load()
    dec = Decoder(settings.money.decimals)
    until = max(dec.decode(line).ts for line in history[-1000:]) + settings.lateness
    report = run_pipeline(history, settings, 2, until)
    months = [m for (grain, _), m in report.items() if grain == "month"]
    assert len(months) >= 3

    def total(get) -> int:
        return sum(get(m) or 0 for m in months)

    for name, get in {
        "retention.d1.retained": lambda m: m["retention"]["d1"]["retained"],
        "retention.d7.retained": lambda m: m["retention"]["d7"]["retained"],
        "retention.d30.retained": lambda m: m["retention"]["d30"]["retained"],
        "activation.converted": lambda m: m["activation"]["converted"],
        "first_purchases": lambda m: m["first_purchases"],
        "inviters": lambda m: m["inviters"],
        "referred_revenue": lambda m: Decimal(m["referred_revenue"]),
        "growth.retained": lambda m: m["growth"]["retained"],
        "growth.resurrected": lambda m: m["growth"]["resurrected"],
        "growth.dormant": lambda m: m["growth"]["dormant"],
    }.items():
        assert total(get) > 0, name
    later = sum(n for (grain, label), m in report.items() if grain == "month"
                for cohort, n in m["cohorts"].items() if cohort != label)
    assert later > 0  # signup cohorts active in later months
    # and none of them is all there is: retention and activation are rates below 1
    assert 0 < total(lambda m: m["retention"]["d7"]["retained"]) < total(lambda m: m["retention"]["d7"]["eligible"])
    assert 0 < total(lambda m: m["activation"]["converted"]) < total(lambda m: m["activation"]["eligible"])
