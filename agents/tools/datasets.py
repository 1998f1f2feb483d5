"""JSON-lines datasets from the traffic simulator: histories, bad lines, duplicates, disorder.

This module owns turning :class:`agents.tools.simulator.Simulator` into
event lines for backfills, tests and benchmarks: :func:`generate` (a history
of exactly ``n_events`` lines spanning about six months, with optional bad
lines, exact duplicate lines and a little disorder: a few lines arrive up to
90 s after later ones), :func:`write_dataset` (the same into a file), the time
scaling that makes a history span :data:`HISTORY_DAYS`, and :func:`bad_line`,
one invalid line of each kind in :data:`BAD_KINDS` (each kind maps to one
rejection reason of :class:`streams.events.Decoder`).
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate

import orjson

from kpimon.agents.tools.simulator import DAY_MS, EVENTS_PER_USER_180D, Simulator

__all__ = [
    "BAD_KINDS",
    "DEFAULT_START_MS",
    "HISTORY_DAYS",
    "MAX_DISORDER_MS",
    "bad_line",
    "default_users",
    "generate",
    "history_time_scale",
    "write_dataset",
]

DEFAULT_START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
MAX_DISORDER_MS = 90_000  # generate(): the most a line is delayed behind later ones


# ------------------------------------------------------------------ bad lines
# kind -> the streams.events.Reason value the Decoder rejects it with
BAD_KINDS: dict[str, str] = {
    "not_json": "not_json",
    "array": "not_object",
    "missing_field": "missing_field",
    "bad_ts": "bad_timestamp",
    "negative_amount": "bad_amount",
    "oversized": "too_large",
}
_BAD_WEIGHTS = (("not_json", 0.22), ("array", 0.15), ("missing_field", 0.2), ("bad_ts", 0.2),
                ("negative_amount", 0.2), ("oversized", 0.03))
_BAD_CUM = list(accumulate(w for _, w in _BAD_WEIGHTS))


def bad_line(rng: random.Random, n: int, user_id: str, ts_ms: int, seed: int = 0, kind: str | None = None) -> bytes:
    """One invalid event line of ``kind`` (drawn when None); see :data:`BAD_KINDS`."""
    if kind is None:
        r = rng.random() * _BAD_CUM[-1]
        kind = _BAD_WEIGHTS[min(bisect_right(_BAD_CUM, r), len(_BAD_WEIGHTS) - 1)][0]
    eid = f"{seed}-bad-{n}"
    base = {"event_id": eid, "user_id": user_id, "type": "page_view", "ts": ts_ms}
    if kind == "not_json":
        return orjson.dumps(base)[: 20 + int(rng.random() * 30)]
    if kind == "array":
        return orjson.dumps([eid, user_id, "page_view", ts_ms])
    if kind == "missing_field":
        del base["user_id" if rng.random() < 0.5 else "event_id"]
        return orjson.dumps(base)
    if kind == "bad_ts":
        base["ts"] = ("yesterday", "2024-03-13 10:21", "2024-03-13T10:21:14", "13/03/2024")[int(rng.random() * 4)]
        return orjson.dumps(base)
    if kind == "negative_amount":
        base.update(type="purchase", amount=f"-{1 + int(rng.random() * 50)}.99")
        return orjson.dumps(base)
    if kind == "oversized":
        base["payload"] = "x" * (64 * 1024 + 1)
        return orjson.dumps(base)
    raise ValueError(f"unknown bad line kind {kind!r}")



# Cumulative events per unit of ``users`` after t simulated days from launch
# (time_scale 1, seeds 0 and 1, users=5000); beyond the table ~4.75/day.
_CUMULATIVE = ((0, 0.0), (30, 10.5), (60, 36.5), (90, 75.8), (120, 126.6), (150, 187.7), (180, 258.4),
               (210, 336.6), (240, 421.9), (270, 513.6), (300, 611.4), (360, 821.7), (420, 1047.6),
               (480, 1289.3), (540, 1544.0), (600, 1811.9), (720, 2380.0))
HISTORY_DAYS = 180.0


def default_users(n_events: int) -> int:
    """A user base that makes ``n_events`` events span about six months at time_scale 1."""
    return max(20, round(n_events / EVENTS_PER_USER_180D))


def history_time_scale(n_events: int, users: int) -> float:
    """The time_scale at which ``n_events`` events of ``users`` span about :data:`HISTORY_DAYS` days."""
    per_user = n_events / users
    days = None
    for (d0, c0), (d1, c1) in zip(_CUMULATIVE, _CUMULATIVE[1:]):
        if per_user <= c1:
            days = d0 + (d1 - d0) * (per_user - c0) / (c1 - c0)
            break
    if days is None:
        last_d, last_c = _CUMULATIVE[-1]
        days = last_d + (per_user - last_c) / 4.75
    return min(50.0, max(0.05, days / HISTORY_DAYS))


def generate(n_events: int, start_ms: int, seed: int = 0, users: int | None = None, bad_ratio: float = 0.0,
             duplicate_ratio: float = 0.0) -> Iterator[bytes]:
    """Exactly ``n_events`` JSON lines of history starting at ``start_ms`` (the product's launch).

    The history spans about six months: with ``users`` given, the model's
    time is scaled (:func:`history_time_scale`) so that ``n_events`` events of
    that user base take about :data:`HISTORY_DAYS` days (fewer events per user
    means more time between sessions).  Without it, the user base is chosen
    for that span at time_scale 1 (:func:`default_users`).

    Lines are in ts order except for a few delayed by up to 90 s.  A share
    ``bad_ratio`` of the lines is invalid (:data:`BAD_KINDS`), a share
    ``duplicate_ratio`` repeats a valid line byte for byte (a producer retry,
    within a minute of event time after the original).
    """
    if not 0 <= bad_ratio + duplicate_ratio < 1:
        raise ValueError("bad_ratio + duplicate_ratio must be in [0, 1)")
    if users is None:
        sim = Simulator(seed, users=default_users(n_events))
    else:
        valid = max(1, round(n_events * (1 - bad_ratio - duplicate_ratio)))
        sim = Simulator(seed, users=users, time_scale=history_time_scale(valid, users))
    side = random.Random(seed * 7919 + 17)
    rand = side.random
    dumps = orjson.dumps
    to_dict = sim.to_dict
    held: list[tuple[int, int, bytes]] = []  # (release ts, n, line): delayed lines and retries
    bad_p = bad_ratio / (1 - duplicate_ratio)  # per line that is not a duplicate
    dup_p = duplicate_ratio / (1 - bad_ratio - duplicate_ratio)  # per valid line
    n = 0
    nbad = 0
    t = start_ms
    chunk = DAY_MS // 4
    while True:
        evs = sim.raw_between(t, t + chunk)
        t += chunk
        if len(evs) < 2_000 and chunk < 8 * DAY_MS:  # keep chunks around a few thousand events
            chunk *= 2
        elif len(evs) > 50_000 and chunk > 60_000:
            chunk //= 2
        for ev in evs:
            ts = ev[0]
            while held and held[0][0] <= ts:
                yield heapq.heappop(held)[2]
                n += 1
                if n >= n_events:
                    return
            while rand() < bad_p:  # invalid lines in front of this event
                nbad += 1
                yield bad_line(side, nbad, ev[2].uid, ts, seed)
                n += 1
                if n >= n_events:
                    return
            line = dumps(to_dict(ev))
            if rand() < dup_p:  # a producer retry: the same bytes again, within a minute
                heapq.heappush(held, (ts + int(rand() * 60_000), n, line))
            if rand() < 0.003:  # this line arrives late, behind later ones
                heapq.heappush(held, (ts + 1000 + int(rand() * (MAX_DISORDER_MS - 1000)), n, line))
                continue
            yield line
            n += 1
            if n >= n_events:
                return


def write_dataset(path: str, n_events: int, start_ms: int = DEFAULT_START_MS, seed: int = 0,
                  users: int | None = None, bad_ratio: float = 0.0, duplicate_ratio: float = 0.0) -> int:
    """Write :func:`generate` output as a JSON-lines file; returns the number of lines."""
    n = 0
    buf: list[bytes] = []
    with open(path, "wb") as fh:
        for line in generate(n_events, start_ms, seed=seed, users=users, bad_ratio=bad_ratio,
                             duplicate_ratio=duplicate_ratio):
            buf.append(line)
            if len(buf) >= 10_000:
                fh.write(b"\n".join(buf) + b"\n")
                n += len(buf)
                buf.clear()
        if buf:
            fh.write(b"\n".join(buf) + b"\n")
            n += len(buf)
    return n
