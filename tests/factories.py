"""Shared test factories: settings, hand-written events and a hypothesis strategy of streams.

Everything here is plain data: events are the JSON objects users send
(``dict``), turned into wire lines with :func:`to_lines`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

from kpimon.config.settings import Settings, from_mapping

HOUR = 3_600_000
DAY = 24 * HOUR
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Small thresholds so that lifecycle transitions happen often in short streams.
SILENT, SLEEPING, CHURNED, DEAD = 2 * DAY, 4 * DAY, 8 * DAY, 16 * DAY
LATENESS = HOUR

DEFAULTS: dict[str, Any] = {
    "timezone": "UTC",
    "lateness": "1h",
    # Much longer than any generated stream: a redelivered event is always
    # refused as a duplicate (never expired from the dedup index).
    "dedup_horizon": "1000d",
    "lifecycle": {
        "silent_after": "2d",
        "sleeping_after": "4d",
        "churned_after": "8d",
        "dead_after": "16d",
        "warning_state": "sleeping",
    },
    "channels": ["organic", "paid_search", "social", "email", "referral"],
    "worker": {"clock": "event"},
    # Short windows, so that generated streams (days to weeks) reach day N and the activation window often.
    "retention": {"days": [1, 2, 7]},
    "activation": {"window_days": 2},
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def settings_factory(**overrides: Any) -> Settings:
    """Test settings (small thresholds, 1h lateness); the environment is ignored.

    Nested sections merge: ``settings_factory(lifecycle={"warning_state": "churned"})``
    keeps the small thresholds.
    """
    return from_mapping(_deep_merge(DEFAULTS, overrides), source="<tests>", env={})


# --------------------------------------------------------------------------- #
# hand-written events


def ms(text: str) -> int:
    """Epoch ms of an ISO-8601 string that carries its own offset (``Z`` allowed)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert dt.tzinfo is not None, text
    return (dt - EPOCH) // timedelta(milliseconds=1)


def rfc3339(ts_ms: int, offset_minutes: int = 0) -> str:
    """``ts_ms`` written as RFC 3339 with milliseconds and the given UTC offset."""
    tz = timezone(timedelta(minutes=offset_minutes))
    text = (EPOCH + timedelta(milliseconds=ts_ms)).astimezone(tz).isoformat(timespec="milliseconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class EventsFactory:
    """Builds event dicts with unique ids: ``ev = events_factory(); ev("u1", "signup", 0, channel="paid")``."""

    def __init__(self, prefix: str = "e") -> None:
        self.prefix = prefix
        self.n = 0

    def __call__(self, user_id: str | None, type_: str, ts: int | str, amount: str | None = None,
                 event_id: str | None = None, **extra: Any) -> dict[str, Any]:
        if event_id is None:
            self.n += 1
            event_id = f"{self.prefix}{self.n}"
        ev: dict[str, Any] = {"event_id": event_id, "type": type_, "ts": ts}
        if user_id is not None:
            ev["user_id"] = user_id
        if amount is not None:
            ev["amount"] = amount
        ev.update(extra)
        return ev


def events_factory(prefix: str = "e") -> EventsFactory:
    return EventsFactory(prefix)


def to_lines(events: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(ev, separators=(",", ":")).encode() for ev in events]


def ts_ms_of(ev: dict[str, Any]) -> int:
    ts = ev["ts"]
    return ts if isinstance(ts, int) else ms(ts)


# --------------------------------------------------------------------------- #
# hypothesis: realistic small streams

# Gaps between a user's consecutive activity instants: around every lifecycle
# threshold (exactly, 1 ms either side, a bit either side), equal instants,
# short gaps and arbitrary ones.
_GAP_CHOICES = [0, 1, 60_000, HOUR, 5 * HOUR, DAY - 1, DAY, DAY + 1]
for _t in (SILENT, SLEEPING, CHURNED, DEAD):
    _GAP_CHOICES += [_t - 1, _t, _t + 1, _t - 3 * HOUR, _t + 3 * HOUR]

_TYPES = ["login", "login", "page_view", "purchase", "purchase", "refund", "invite", "signup", "app_open"]
_CHANNELS = [None, "organic", "paid_search", "social", "email", "referral", "tiktok", "Organic"]
_STARTS = [
    ms("2024-01-22T00:00:00Z"),  # a Monday; the week 2024-W05 straddles January/February
    ms("2024-01-27T23:30:00Z"),
    ms("2023-12-20T00:00:00Z"),  # year end, 2023-W52 / 2024-W01
    ms("2020-12-24T12:00:00Z"),  # 2020-W53
    ms("2024-03-05T00:00:00Z"),  # DST in America/New_York on 2024-03-10
    ms("2024-10-28T00:00:00Z"),  # DST back on 2024-11-03
]

amounts = st.builds(lambda cents: f"{cents // 100}.{cents % 100:02d}",
                    st.one_of(st.integers(0, 500), st.integers(0, 100_000)))


@st.composite
def _user_events(draw: st.DrawFn, uid: str, base: int) -> list[dict[str, Any]]:
    t = base + draw(st.sampled_from([0, HOUR, DAY, 3 * DAY])) + draw(st.integers(0, 2 * DAY))
    n_instants = draw(st.integers(1, 10))
    out: list[dict[str, Any]] = []
    signed_up = False
    for i in range(n_instants):
        if i:
            t += draw(st.one_of(st.sampled_from(_GAP_CHOICES), st.integers(0, 20 * DAY)))
        for _ in range(draw(st.integers(1, 3))):
            if not signed_up and draw(st.integers(0, 3)):
                type_ = "signup"
            else:
                type_ = draw(st.sampled_from(_TYPES))
            ev: dict[str, Any] = {"user_id": uid, "type": type_, "ts": t}
            if type_ == "signup":
                signed_up = True
                ch = draw(st.sampled_from(_CHANNELS))
                if ch is not None:
                    ev["channel"] = ch
                if draw(st.booleans()):
                    ev["referrer_id"] = f"r{draw(st.integers(0, 3))}"
            elif type_ in ("purchase", "refund"):
                ev["amount"] = draw(amounts)
            out.append(ev)
    return out


@st.composite
def streams_of_events(draw: st.DrawFn, max_users: int = 5, duplicates: bool = True) -> list[dict[str, Any]]:
    """A small stream of event dicts in event-time order (ties in any order).

    Some events carry RFC 3339 timestamps with an offset, the rest epoch ms.
    With ``duplicates``, exact copies of some events (same event_id, same
    content) are inserted right after the original or at the very end.
    """
    base = draw(st.sampled_from(_STARTS))
    n_users = draw(st.integers(1, max_users))
    events: list[dict[str, Any]] = []
    for u in range(n_users):
        events += draw(_user_events(f"u{u}", base))
    # Stable ids, independent of order; then interleave the users by time.
    events = draw(st.permutations(events))
    for i, ev in enumerate(events):
        ev["event_id"] = f"ev{i:04d}"
    events.sort(key=lambda ev: ev["ts"])
    for ev in events:
        if draw(st.integers(0, 4)) == 0:
            ev["ts"] = rfc3339(ev["ts"], draw(st.sampled_from([0, 120, -300, 330])))
    if duplicates and events:
        dups = draw(st.lists(st.integers(0, len(events) - 1), max_size=4))
        for idx in sorted(dups, reverse=True):
            copy = dict(events[idx])
            if draw(st.booleans()):
                events.insert(idx + 1, copy)
            else:
                events.append(copy)
    return events
