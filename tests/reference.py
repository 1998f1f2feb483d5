"""A plain batch computation of the KPI report, straight from the definitions.

This is the oracle the streaming engine is checked against.  It shares no code
with the engine: only :class:`agents.core.periods.Calendar` for period
arithmetic (start/end/label of calendar periods) and ``format_money`` for the
output format.  It is deliberately slow and simple: for every period it looks
at every user and every event again.

Definitions (docs: the metric spec):

* Accepted events: the first occurrence of each ``event_id``, minus late
  events (``ts`` below the watermark ``max accepted ts - lateness`` of its
  partition, in arrival order).  Invalid events (missing required fields,
  purchase/refund without amount) are refused.
* A user's activity instants a1 < a2 < ... are the distinct ``ts`` of all
  their accepted events.  The user enters state S at a_i + T_S if a_{i+1} is
  strictly later than that instant (or never comes).
* won back: a_{i+1} with a_{i+1} - a_i > T_churned ("dead" if > T_dead).
* population of P: every user with an activity before P's end, classified by
  ``end - last activity before end`` (<= T_silent active, ... > T_dead dead).
* The first signup of a user is the earliest by ``(ts, event_id)``; its local day is the signup day.
* N-day retention of P: eligible, the users whose signup day + N days is a day of P; retained, those of
  them with an event on that day.
* Referred revenue of P: net revenue in P from events at or after the user's first signup, of users whose first
  signup had a ``referrer_id``.  Inviters of P: users with an invite in P.
* First purchases of P: users whose first purchase is in P.  Activation (window W days) of P: eligible, the
  users whose signup day + W days is a day of P; converted, those of them with a purchase from the start of
  their signup day to the start of that day.
* Cohorts of a week or month P: for P and each of the ``cohort_horizon`` periods before it, the users whose
  first signup is in that period and who have an event in P.
"""

from __future__ import annotations

import decimal
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from kpimon.agents.core.grains import GRAINS
from kpimon.agents.core.periods import get_calendar
from kpimon.streams.events import format_money

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STATE_NAMES = ["active", "silent", "sleeping", "churned", "dead"]


def _ts_ms(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("bool is not a timestamp")
    if isinstance(value, int):
        return value
    dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("timestamp without offset")
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _minor(value: Any, decimals: int) -> int:
    amount = decimal.Decimal(str(value))
    scaled = amount * (decimal.Decimal(10) ** decimals)
    if scaled != scaled.to_integral_value() or amount < 0:
        raise ValueError(f"bad amount {value!r}")
    return int(scaled)


def _normalize(raw: dict[str, Any], decimals: int) -> dict[str, Any] | None:
    """The event with ``ts`` in epoch ms and ``amount`` in minor units, or None if invalid."""
    try:
        for key in ("event_id", "user_id", "type", "ts"):
            if raw.get(key) in (None, ""):
                return None
        ev = dict(raw)
        ev["ts"] = _ts_ms(raw["ts"])
        if raw["type"] in ("purchase", "refund"):
            if raw.get("amount") is None:
                return None
        ev["amount"] = _minor(raw["amount"], decimals) if raw.get("amount") is not None else 0
        return ev
    except (ValueError, TypeError, AttributeError, decimal.InvalidOperation):
        return None


def accepted_events(events: list[dict[str, Any]], settings: Any,
                    partition_of: Callable[[dict[str, Any]], int] | None = None) -> list[dict[str, Any]]:
    """The accepted set, in arrival order: valid, first of their event_id, not late."""
    decimals = settings.money.decimals
    seen: set[str] = set()
    max_ts: dict[int, int] = {}
    out = []
    for raw in events:
        ev = _normalize(raw, decimals)
        if ev is None:
            continue
        if ev["event_id"] in seen:
            continue  # duplicate
        part = partition_of(raw) if partition_of else 0
        if part in max_ts and ev["ts"] < max_ts[part] - settings.lateness:
            continue  # late
        seen.add(ev["event_id"])
        max_ts[part] = max(max_ts.get(part, ev["ts"]), ev["ts"])
        out.append(ev)
    return out


def _channel(settings: Any, channel: str | None) -> str:
    if channel is None:
        return "unknown"
    if channel in settings.channels:
        return channel
    return "other"


def _state_before_end(end: int, last: int, th: tuple[int, int, int, int]) -> str:
    gap = end - last
    silent, sleeping, churned, dead = th
    if gap <= silent:
        return "active"
    if gap <= sleeping:
        return "silent"
    if gap <= churned:
        return "sleeping"
    if gap <= dead:
        return "churned"
    return "dead"


def period_numbers(start: int, end: int, events: list[dict[str, Any]], settings: Any,
                   prev_start: int | None = None, cohorts: list[Any] | None = None) -> dict[str, Any]:
    """The raw numbers (money in minor units) of the period [start, end); ``prev_start``: the start of the
    period before it, for growth accounting (default: none is counted); ``cohorts``: the signup-cohort
    periods to count (a week's or month's)."""
    cal = get_calendar(settings.timezone)
    th = settings.lifecycle.thresholds
    silent, sleeping, churned, dead = th
    state_thresholds = {"silent": silent, "sleeping": sleeping, "churned": churned, "dead": dead}

    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        by_user[ev["user_id"]].append(ev)

    n: dict[str, Any] = {
        "new_users": 0, "active_users": 0, "orders": 0, "paying_users": 0, "revenue": 0, "refunds": 0,
        "invites": 0, "referred_signups": 0, "entered_silent": 0, "entered_sleeping": 0, "entered_churned": 0,
        "entered_dead": 0, "won_back_churned": 0, "won_back_dead": 0,
        "population": {name: 0 for name in _STATE_NAMES}, "new_users_by_channel": {},
        "growth_new": 0, "growth_retained": 0, "growth_resurrected": 0, "growth_dormant": 0,
        "retention": {n: [0, 0] for n in settings.retention.days}, "first_purchases": 0,
        "referred_revenue": 0, "inviters": 0,
        "activation": [0, 0],
        "cohorts": None if cohorts is None else {c.label: 0 for c in cohorts},
    }

    def inside(t: int) -> bool:
        return start <= t < end

    for uid in sorted(by_user):
        evs = sorted(by_user[uid], key=lambda e: (e["ts"], e["event_id"]))
        # signups: the first one by (ts, event_id)
        signups = [e for e in evs if e["type"] == "signup"]
        if signups:
            signup_ts = signups[0]["ts"]
            signup_day = cal.day_ordinal(signup_ts)
            for days, counts in n["retention"].items():
                day_n = cal.periods_of_day(signup_day + days)[0]
                if inside(day_n.start_ms):
                    counts[0] += 1
                    if any(day_n.start_ms <= e["ts"] < day_n.end_ms for e in evs):
                        counts[1] += 1
            window = settings.activation.window_days
            day_w = cal.periods_of_day(signup_day + window)[0]
            if inside(day_w.start_ms):
                n["activation"][0] += 1
                since = cal.periods_of_day(signup_day)[0].start_ms
                if any(e["type"] == "purchase" and since <= e["ts"] < day_w.start_ms for e in evs):
                    n["activation"][1] += 1
            for c in cohorts or ():
                if c.start_ms <= signup_ts < c.end_ms and any(inside(e["ts"]) for e in evs):
                    n["cohorts"][c.label] += 1
        if signups and inside(signups[0]["ts"]):
            first = signups[0]
            n["new_users"] += 1
            ch = _channel(settings, first.get("channel"))
            n["new_users_by_channel"][ch] = n["new_users_by_channel"].get(ch, 0) + 1
            if first.get("referrer_id") is not None:
                n["referred_signups"] += 1
        # events in P
        in_p = [e for e in evs if inside(e["ts"])]
        if in_p:
            n["active_users"] += 1
        purchases = [e for e in in_p if e["type"] == "purchase"]
        if signups and signups[0].get("referrer_id") is not None:
            for e in in_p:
                if e["ts"] >= signups[0]["ts"] and e["type"] in ("purchase", "refund"):
                    n["referred_revenue"] += e["amount"] if e["type"] == "purchase" else -e["amount"]
        if any(e["type"] == "invite" for e in in_p):
            n["inviters"] += 1
        all_purchases = [e for e in evs if e["type"] == "purchase"]
        if all_purchases and inside(all_purchases[0]["ts"]):
            n["first_purchases"] += 1
        n["orders"] += len(purchases)
        if purchases:
            n["paying_users"] += 1
        for e in purchases:
            n["revenue"] += e["amount"]
        for e in in_p:
            if e["type"] == "refund":
                n["revenue"] -= e["amount"]
                n["refunds"] += e["amount"]
            elif e["type"] == "invite":
                n["invites"] += 1
        # lifecycle
        instants = sorted({e["ts"] for e in evs})
        for i, a in enumerate(instants):
            nxt = instants[i + 1] if i + 1 < len(instants) else None
            for name, threshold in state_thresholds.items():
                instant = a + threshold
                if (nxt is None or nxt > instant) and inside(instant):
                    n[f"entered_{name}"] += 1
            if i > 0 and inside(a):
                gap = a - instants[i - 1]
                if gap > dead:
                    n["won_back_dead"] += 1
                elif gap > churned:
                    n["won_back_churned"] += 1
        # growth accounting: active in P, in the period before it, ever before P
        ever_before = bool(instants) and instants[0] < start
        before = prev_start is not None and any(prev_start <= a < start for a in instants)
        if in_p:
            if not ever_before:
                n["growth_new"] += 1
            elif before:
                n["growth_retained"] += 1
            else:
                n["growth_resurrected"] += 1
        elif before:
            n["growth_dormant"] += 1
        before_end = [a for a in instants if a < end]
        if before_end:
            n["population"][_state_before_end(end, before_end[-1], th)] += 1
    return n


def _is_empty(n: dict[str, Any]) -> bool:
    for key, value in n.items():
        if key == "retention":
            if any(e or r for e, r in value.values()):
                return False
        elif key == "activation":
            if any(value):
                return False
        elif isinstance(value, dict):
            if any(value.values()):
                return False
        elif value:
            return False
    return True


def _result(n: dict[str, Any], settings: Any) -> dict[str, Any]:
    decimals = settings.money.decimals
    warning = settings.lifecycle.warning_state
    return {
        "new_users": n["new_users"],
        "active_users": n["active_users"],
        "orders": n["orders"],
        "paying_users": n["paying_users"],
        "revenue": format_money(n["revenue"], decimals),
        "refunds": format_money(n["refunds"], decimals),
        "invites": n["invites"],
        "referred_signups": n["referred_signups"],
        "entered_silent": n["entered_silent"],
        "entered_sleeping": n["entered_sleeping"],
        "entered_churned": n["entered_churned"],
        "entered_dead": n["entered_dead"],
        "churn_warnings": n[f"entered_{warning}"],
        "churned": n["entered_churned"],
        "won_back": n["won_back_churned"] + n["won_back_dead"],
        "won_back_by_depth": {"churned": n["won_back_churned"], "dead": n["won_back_dead"]},
        "population": dict(n["population"]),
        "new_users_by_channel": dict(sorted(n["new_users_by_channel"].items())),
        "growth": {"new": n["growth_new"], "retained": n["growth_retained"],
                   "resurrected": n["growth_resurrected"], "dormant": n["growth_dormant"],
                   "quick_ratio": _quick_ratio(n["growth_new"] + n["growth_resurrected"], n["growth_dormant"])},
        "retention": {f"d{days}": {"eligible": e, "retained": r, "rate": _quick_ratio(r, e)}
                      for days, (e, r) in sorted(n["retention"].items())},
        "first_purchases": n["first_purchases"],
        "referred_revenue": format_money(n["referred_revenue"], decimals),
        "inviters": n["inviters"],
        "activation": {"eligible": n["activation"][0], "converted": n["activation"][1],
                       "rate": _quick_ratio(n["activation"][1], n["activation"][0])},
        **({} if n["cohorts"] is None else {"cohorts": dict(sorted(n["cohorts"].items()))}),
    }


def _quick_ratio(gained: int, dormant: int) -> str | None:
    """(new + resurrected) / dormant (or retained / eligible), rounded half-even to 4 places; no value with a
    zero denominator."""
    if dormant == 0:
        return None
    return str((decimal.Decimal(gained) / decimal.Decimal(dormant)).quantize(decimal.Decimal("0.0001"),
                                                                            rounding=decimal.ROUND_HALF_EVEN))


def reference_report(events: list[dict[str, Any]], settings: Any, until_ms: int, *,
                     partition_of: Callable[[dict[str, Any]], int] | None = None,
                     ) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(grain, label): numbers}`` of every non-empty period with ``end <= until_ms``.

    ``events`` are raw event dicts in arrival order (duplicates and late ones
    included: they are refused here as the spec says).  ``partition_of``
    gives the partition of an event for the per-partition watermark
    (default: one partition).
    """
    accepted = accepted_events(events, settings, partition_of)
    report: dict[tuple[str, str], dict[str, Any]] = {}
    if not accepted:
        return report
    cal = get_calendar(settings.timezone)
    first = min(ev["ts"] for ev in accepted)
    for grain in GRAINS:
        if until_ms <= first:
            continue
        for period in cal.periods_between(first, until_ms, grain):
            if period.end_ms > until_ms:
                continue
            prev = cal.period_at(period.start_ms - 1, grain)
            cohorts = None
            if grain in ("week", "month"):
                cohorts = [period]
                while len(cohorts) <= settings.retention.cohort_horizon:
                    cohorts.append(cal.period_at(cohorts[-1].start_ms - 1, grain))
            n = period_numbers(period.start_ms, period.end_ms, accepted, settings, prev.start_ms, cohorts)
            if not _is_empty(n):
                report[(str(grain), period.label)] = _result(n, settings)
    return report


def totals_of(events: list[dict[str, Any]], settings: Any,
              partition_of: Callable[[dict[str, Any]], int] | None = None) -> dict[str, int]:
    """accepted / duplicates+late split is order dependent; this gives accepted and refused counts."""
    decimals = settings.money.decimals
    valid = [ev for ev in events if _normalize(ev, decimals) is not None]
    accepted = accepted_events(events, settings, partition_of)
    return {"accepted": len(accepted), "refused": len(valid) - len(accepted),
            "rejected": len(events) - len(valid)}
