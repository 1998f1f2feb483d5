"""The serving layer's expected content, computed plainly from the accepted events (no engine code).

As of a watermark ``wm`` every accepted event with ``ts < wm`` is applied.  A
user with such an event has: last activity = the latest of those ``ts``;
lifecycle state = the deepest state S with ``wm - last > T_S`` (the state just
before ``wm``); signup = the earliest signup by ``(ts, event_id)`` (its ``ts``
and raw channel); lifetime revenue = purchases minus refunds, in minor units.
"""

from __future__ import annotations

from typing import Any

from kpimon.streams.events import format_money

STATES = ("active", "silent", "sleeping", "churned", "dead")


def state_before(wm: int, last: int, thresholds: tuple[int, int, int, int]) -> str:
    gap = wm - last
    state = "active"
    for name, threshold in zip(STATES[1:], thresholds):
        if gap > threshold:
            state = name
    return state


def expected_users(events: list[dict[str, Any]], wm: int, thresholds: tuple[int, int, int, int],
                   decimals: int = 2) -> dict[str, dict[str, Any]]:
    """user_id -> the fields :func:`agents.serving.get_user` returns, for events given as dicts.

    Each event needs ``user_id``, ``type``, ``ts`` (epoch ms), ``event_id``,
    ``amount`` (minor units, purchases and refunds) and ``channel`` (signups).
    """
    out: dict[str, dict[str, Any]] = {}
    signups: dict[str, tuple[int, str]] = {}
    for ev in events:
        if ev["ts"] >= wm:
            continue
        uid = ev["user_id"]
        u = out.setdefault(uid, {"user_id": uid, "last_activity": ev["ts"], "signup_ts": None, "channel": None,
                                 "lifetime_revenue_minor": 0})
        u["last_activity"] = max(u["last_activity"], ev["ts"])
        if ev["type"] == "purchase":
            u["lifetime_revenue_minor"] += ev["amount"]
        elif ev["type"] == "refund":
            u["lifetime_revenue_minor"] -= ev["amount"]
        elif ev["type"] == "signup" and (uid not in signups or (ev["ts"], ev["event_id"]) < signups[uid]):
            signups[uid] = (ev["ts"], ev["event_id"])
            u["signup_ts"], u["channel"] = ev["ts"], ev.get("channel")
    for u in out.values():
        u["state"] = state_before(wm, u["last_activity"], thresholds)
        u["lifetime_revenue"] = format_money(u["lifetime_revenue_minor"], decimals)
    return out
