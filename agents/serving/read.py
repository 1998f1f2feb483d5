"""Reading the serving layer back for people: one user, the at-risk lists, CSV and JSON exports.

The writer side (what is in Redis and how it gets there exactly once) is
:mod:`agents.serving.writer`; this module only reads the ``<p>user:<user_id>``
hashes and ``<p>at-risk:<state>`` sorted sets it maintains.  Used by the
``kpimon users`` commands and the HTTP API.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson

from kpimon.agents.core.lifecycle import STATES
from kpimon.agents.serving import csvsafe

MAX_PAGE = 10_000  # most users one at-risk read returns
FIELDS = ("state", "last_activity", "signup_ts", "channel", "lifetime_revenue_minor", "lifetime_revenue")
CSV_HEADER = ("user_id", "state", "last_activity", "signup_ts", "channel", "lifetime_revenue")

# KEYS[1] the state's sorted set; ARGV: key prefix, first rank, last rank.  One consistent read.
PAGE_LUA = """
local ids = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[3])
local out = {}
for _, uid in ipairs(ids) do
  out[#out + 1] = uid
  out[#out + 1] = redis.call('HMGET', ARGV[1] .. 'user:' .. uid,
    'state', 'last_activity', 'signup_ts', 'channel', 'lifetime_revenue_minor', 'lifetime_revenue')
end
return out
"""


def _s(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(value: bytes | str) -> str:
    """A value Redis always has (a sorted set's member), as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _user(uid: str, values: list) -> dict[str, Any] | None:
    state, last, signup, channel, rev_minor, rev = (_s(v) for v in values)
    if state is None:
        return None
    return {"user_id": uid, "state": state, "last_activity": int(last) if last else None,
            "signup_ts": int(signup) if signup else None, "channel": channel or None,
            "lifetime_revenue": rev or "0", "lifetime_revenue_minor": int(rev_minor) if rev_minor else 0}


async def get_user(redis: Any, prefix: str, user_id: str) -> dict[str, Any] | None:
    """One user's serving state (epoch ms, revenue as a decimal string), or None if unknown."""
    return _user(user_id, await redis.hmget(f"{prefix}user:{user_id}", list(FIELDS)))


async def at_risk(redis: Any, prefix: str, state: str, limit: int, offset: int = 0) -> list[dict[str, Any]]:
    """Users in ``state``, by last activity, **oldest first**: the longest silent, the nearest to the next state.

    One consistent read (a Lua script): ranks ``offset .. offset+limit-1`` of
    the state's sorted set with each user's fields.  ``limit`` is at most
    :data:`MAX_PAGE`.  Users with the same last activity come in user_id order.
    """
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}: one of {', '.join(STATES)}")
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    if offset < 0:
        raise ValueError("offset must not be negative")
    raw = await redis.eval(PAGE_LUA, 1, f"{prefix}at-risk:{state}", prefix, offset, offset + limit - 1)
    out = []
    for i in range(0, len(raw), 2):
        user = _user(_text(raw[i]), raw[i + 1])
        if user is not None:
            out.append(user)
    return out


async def iter_at_risk(redis: Any, prefix: str, state: str, limit: int | None = None,
                       page: int = 5000) -> AsyncIterator[dict[str, Any]]:
    """Every user in ``state`` (or the first ``limit``), oldest activity first, read page by page.

    Pages are read by rank: users moving between states during the export can
    be missed or repeated across pages (each page is consistent in itself).
    """
    offset = 0
    while limit is None or offset < limit:
        n = page if limit is None else min(page, limit - offset)
        users = await at_risk(redis, prefix, state, n, offset)
        for user in users:
            yield user
        if len(users) < n:
            return
        offset += n


def present(user: dict[str, Any], calendar: Any) -> dict[str, Any]:
    """A user for people: instants as RFC 3339 in the configured timezone (epoch ms kept alongside)."""
    last, signup = user["last_activity"], user["signup_ts"]
    return {"user_id": user["user_id"], "state": user["state"],
            "last_activity": calendar.iso(last) if last is not None else None, "last_activity_ms": last,
            "signup_ts": calendar.iso(signup) if signup is not None else None, "signup_ts_ms": signup,
            "channel": user["channel"], "lifetime_revenue": user["lifetime_revenue"]}


def csv_rows(users: Iterable[dict[str, Any]], calendar: Any, header: bool = True) -> str:
    """CSV lines (header :data:`CSV_HEADER`); cells a spreadsheet would run as formulas are
    neutralised (:mod:`agents.csvsafe`)."""
    buf = io.StringIO()
    w = csvsafe.writer(buf, lineterminator="\n")
    if header:
        w.writerow(CSV_HEADER)
    for user in users:
        u = present(user, calendar)
        w.writerow([u["user_id"], u["state"], u["last_activity"] or "", u["signup_ts"] or "", u["channel"] or "",
                    u["lifetime_revenue"]])
    return buf.getvalue()


async def export_at_risk(redis: Any, prefix: str, state: str, fmt: str, calendar: Any,
                         write: Callable[[str], Any], limit: int | None = None) -> int:
    """Write the users in ``state`` as CSV (header :data:`CSV_HEADER`) or a JSON array; returns how many."""
    if fmt not in ("csv", "json"):
        raise ValueError(f"unknown format {fmt!r}: csv or json")
    n = 0
    batch: list[dict[str, Any]] = []

    def emit(final: bool = False) -> None:
        nonlocal batch
        if fmt == "csv":
            write(csv_rows(batch, calendar, header=(n == len(batch))))
        else:
            for i, user in enumerate(batch):
                sep = "[\n" if n - len(batch) + i == 0 else ",\n"
                write(sep + orjson.dumps(present(user, calendar)).decode())
            if final:
                write("\n]\n" if n else "[]\n")
        batch = []

    async for user in iter_at_risk(redis, prefix, state, limit):
        batch.append(user)
        n += 1
        if len(batch) >= 1000:
            emit()
    emit(final=True)
    return n


__all__ = [
    "CSV_HEADER",
    "FIELDS",
    "MAX_PAGE",
    "PAGE_LUA",
    "at_risk",
    "csv_rows",
    "export_at_risk",
    "get_user",
    "iter_at_risk",
    "present",
]
