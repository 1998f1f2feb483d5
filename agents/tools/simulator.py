"""A seeded, deterministic model of user traffic, for the demo, backfills and benchmarks.

Pure Python (``random.Random(seed)``), no Kafka.  The same seed and the same
calls give the same events, whatever the chunking of :meth:`Simulator.events_between`.

The model, in *simulated days* (``time_scale`` compresses them: one simulated
day lasts ``86_400_000 / time_scale`` ms on the output time axis):

* **Acquisition.**  New users arrive as a Poisson process, ``users / 90`` per
  simulated day, through weighted channels (organic, paid search, social,
  email, a small "tiktok" share that kpimon reports as ``other``, and a few
  signups without any channel).  Invites bring *referral* signups: a share of
  the ``invite`` events is followed, some hours or days later, by a signup
  with ``channel: referral`` and ``referrer_id`` = the inviting user.
* **Activation.**  A signup is followed at once by a first session; about a
  quarter of the new users bounce (almost never come back).
* **Sessions.**  ``session_start`` (web) or ``app_open`` (app), sometimes a
  ``login``, a geometric number of ``page_view``; with a per-user probability a
  ``purchase`` (price points like ``19.99`` or basket totals like ``37.42``),
  occasionally a ``refund`` of an earlier purchase of the same user, and
  ``invite`` events.
* **Engagement decay.**  Each user has a base session rate (log-normal,
  heavy users have several sessions a day) that decays exponentially with a
  per-user half-life; the gap to the next session is exponential with the
  current rate.  Gaps of one to three weeks make users silent or sleeping and
  come back; a drawn gap above three weeks is a *lapse*: most lapsed users
  never come back (they go churned, then dead), the others are won back by a
  "campaign" 32--150 days later with a fresh (lower) engagement.
* **Time of day.**  Sessions that would start between 01:00 and 06:00 UTC
  (simulated) are mostly pushed to the morning.

Timestamps follow the event contract: most web clients send RFC 3339 in UTC
(``...Z``), some with a local offset (``+02:00``), app clients send epoch ms.

:func:`generate` turns the model into JSON lines for backfills and
benchmarks, with optional bad lines (each kind maps to one rejection reason of
:class:`streams.events.Decoder`, see :data:`BAD_KINDS`), exact duplicate lines
and a little disorder (a few lines arrive up to 90 s after later ones).
"""

from __future__ import annotations

import datetime as _dt
import heapq
import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

import orjson

DAY_MS = 86_400_000
ARRIVAL_DAYS = 90.0  # ``users`` users arrive per this many simulated days
DEFAULT_START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
MAX_DISORDER_MS = 90_000  # generate(): the most a line is delayed behind later ones

# Acquisition mix of the non-referral arrivals (None: a signup without "channel").
DEFAULT_CHANNELS: dict[str | None, float] = {
    "organic": 0.33,
    "paid_search": 0.25,
    "social": 0.18,
    "email": 0.10,
    "tiktok": 0.05,  # not in kpimon's channel allow-list: reported as "other"
    None: 0.02,  # reported as "unknown"
}

PRICE_POINTS = (499, 999, 999, 1499, 1999, 1999, 2499, 4999, 9999)  # cents
OFFSETS_MIN = (60, 120, -300, -240, 330, 540, -180)

# Model constants (simulated days / probabilities).
BOUNCE_P = 0.25
LAPSE_DAYS = 21.0
WINBACK_P = 0.3
WINBACK_MIN_DAYS, WINBACK_MAX_DAYS = 32.0, 150.0
MIN_GAP_DAYS = 0.02  # ~30 min between two sessions of a user
REFUND_P = 0.008  # per session of a user with a purchase not refunded yet
INVITE_ACCEPT_P = 0.35
LOGIN_P = 0.3

# Calibration, measured over seeds 0-2: events in the first 180 simulated days
# of a history per unit of ``users`` (256-265), and events per simulated day
# per unit of ``users`` after a 120-day warm-up (1.5-2.1; the base keeps
# growing slowly).  :func:`time_scale_for` measures the latter exactly.
EVENTS_PER_USER_180D = 260.0
EVENTS_PER_USER_DAY = 1.9

_ARRIVE, _SESSION, _REFERRAL = 0, 1, 2
_FMT_Z, _FMT_OFFSET, _FMT_MS = 0, 1, 2


class _User:
    __slots__ = ("idx", "uid", "e0", "k", "anchor", "buy_p", "invite_p", "fmt", "off", "suffix", "purchases")
    # set by Simulator._signup right after construction
    e0: float  # base session rate, sessions per simulated day
    k: float  # decay constant of the rate, per simulated day
    anchor: float  # time the decay starts from
    buy_p: float
    invite_p: float
    fmt: int  # _FMT_Z / _FMT_OFFSET / _FMT_MS
    off: int  # UTC offset in minutes (_FMT_OFFSET)
    suffix: str  # "Z" or "+hh:mm"

    def __init__(self, idx: int, uid: str) -> None:
        self.idx = idx
        self.uid = uid
        self.purchases: list[tuple[int, int]] = []  # (event seq, cents) not refunded yet


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


_EPOCH_ORD = _dt.date(1970, 1, 1).toordinal()
_dates: dict[int, str] = {}


def _rfc3339(ms: int, off_min: int, suffix: str) -> str:
    local = ms + off_min * 60_000
    d, rem = divmod(local, DAY_MS)
    date = _dates.get(d)
    if date is None:
        if len(_dates) > 100_000:
            _dates.clear()
        date = _dates[d] = _dt.date.fromordinal(_EPOCH_ORD + d).isoformat()
    h, rem = divmod(rem, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, milli = divmod(rem, 1000)
    return f"{date}T{h:02d}:{m:02d}:{s:02d}.{milli:03d}{suffix}"


class Simulator:
    """Users, sessions, money and lifecycle on an explicit time axis (ms).

    ``users``: about this many users sign up per 90 simulated days (the
    arrivals go on at that rate).  ``warmup_days``: on the first call the model
    starts that many simulated days earlier, silently, so that a live run
    starts with an established base instead of an empty product.
    ``time_scale``: simulated time runs this many times faster than the output
    time axis (1.0 for histories; the demo uses tens of thousands).
    """

    def __init__(self, seed: int = 0, users: int = 2000,
                 channels: Mapping[str | None, float] | Sequence[str] | None = None,
                 time_scale: float = 1.0, warmup_days: float = 0.0) -> None:
        if users <= 0:
            raise ValueError("users must be positive")
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if channels is None:
            channels = DEFAULT_CHANNELS
        if not isinstance(channels, Mapping):
            channels = {ch: 1.0 for ch in channels}
        self.seed = seed
        self.users = users
        self.time_scale = time_scale
        self.warmup_days = warmup_days
        self.day = DAY_MS / time_scale  # output ms per simulated day
        self.rng = random.Random(seed)
        self._channels = list(channels)
        self._channel_cum = list(accumulate(channels.values()))
        self._arrival_mean_days = ARRIVAL_DAYS / users
        self._heap: list[tuple[float, int, int, Any]] = []
        self._hseq = 0
        self._eseq = 0
        # generated events not handed out yet: (ts, seq, user, type, extra)
        self._pending: list[tuple[int, int, _User, str, dict | None]] = []
        self._now: float | None = None
        self.population: list[_User] = []
        self.stats = {"signups": 0, "referral_signups": 0, "bounced": 0, "lapsed": 0, "won_back": 0,
                      "purchases": 0, "refunds": 0, "invites": 0}

    # ------------------------------------------------------------------ API
    def events_between(self, t0_ms: int, t1_ms: int) -> list[dict]:
        """Events with ``t0 <= ts < t1``, sorted by ts (state carries over between calls)."""
        return [self.to_dict(ev) for ev in self.raw_between(t0_ms, t1_ms)]

    def raw_between(self, t0_ms: int, t1_ms: int) -> list[tuple]:
        """Like :meth:`events_between` but as compact tuples (see :meth:`to_dict`)."""
        if self._now is None:
            start = t0_ms - self.warmup_days * self.day
            self._now = start
            self._push(start + self.rng.expovariate(1.0) * self._arrival_mean_days * self.day, _ARRIVE, None)
        if t0_ms > self._now:  # skipped time (and the warm-up): simulate, hand out nothing
            self._advance(t0_ms)
            self._take(t0_ms)
        if t1_ms <= self._now:
            return []
        self._advance(t1_ms)
        return self._take(t1_ms)

    def to_dict(self, ev: tuple) -> dict:
        ts, seq, user, typ, extra = ev
        fmt = user.fmt
        d = {"event_id": f"{self.seed}-{seq}", "user_id": user.uid, "type": typ,
             "ts": ts if fmt == _FMT_MS else _rfc3339(ts, user.off, user.suffix)}
        if extra is not None:
            d.update(extra)
        return d

    def to_line(self, ev: tuple) -> bytes:
        return orjson.dumps(self.to_dict(ev))

    # ------------------------------------------------------------- internals
    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._hseq += 1
        heapq.heappush(self._heap, (t, self._hseq, kind, payload))

    def _take(self, t_end: float) -> list[tuple]:
        pend = self._pending
        pend.sort(key=_sort_key)
        i = bisect_left(pend, t_end, key=_ts_key)
        out = pend[:i]
        del pend[:i]
        return out

    def _advance(self, t_end: float) -> None:
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] < t_end:
            t, _, kind, payload = pop(heap)
            if kind == _SESSION:
                self._session(t, payload)
            elif kind == _ARRIVE:
                self._signup(t, self._draw_channel(), None)
                self._push(t + self.rng.expovariate(1.0) * self._arrival_mean_days * self.day, _ARRIVE, None)
            else:
                self._signup(t, "referral", payload)
        self._now = t_end

    def _draw_channel(self) -> str | None:
        r = self.rng.random() * self._channel_cum[-1]
        return self._channels[min(bisect_right(self._channel_cum, r), len(self._channels) - 1)]

    def _event(self, ts: float, user: _User, typ: str, extra: dict | None = None) -> int:
        self._eseq += 1
        self._pending.append((int(ts), self._eseq, user, typ, extra))
        return self._eseq

    def _signup(self, t: float, channel: str | None, referrer: _User | None) -> None:
        rng = self.rng
        idx = len(self.population)
        u = _User(idx, f"u{idx:07d}")
        self.population.append(u)
        if rng.random() < BOUNCE_P:
            u.e0 = 0.01
            self.stats["bounced"] += 1
        else:
            u.e0 = min(4.0, math.exp(rng.gauss(-0.9, 0.9)))
        u.k = math.log(2) / rng.uniform(20.0, 200.0)
        u.anchor = t
        u.buy_p = 0.01 + 0.2 * rng.random() ** 2
        u.invite_p = 0.04 * rng.random() ** 2 + (0.01 if referrer is not None else 0.0)
        r = rng.random()
        u.fmt = _FMT_Z if r < 0.55 else _FMT_OFFSET if r < 0.75 else _FMT_MS
        if u.fmt == _FMT_OFFSET:
            off = OFFSETS_MIN[int(rng.random() * len(OFFSETS_MIN))]
            u.off = off
            u.suffix = f"{'+' if off >= 0 else '-'}{abs(off) // 60:02d}:{abs(off) % 60:02d}"
        else:
            u.off, u.suffix = 0, "Z"
        extra: dict[str, str] = {}
        if channel is not None:
            extra["channel"] = channel
        if referrer is not None:
            extra["referrer_id"] = referrer.uid
            self.stats["referral_signups"] += 1
        self.stats["signups"] += 1
        self._event(t, u, "signup", extra or None)
        self._session(t + self.day * rng.uniform(2, 30) / 86400, u)

    def _session(self, t: float, u: _User) -> None:
        rng = self.rng
        rand = rng.random
        sec = self.day / 86400
        ev = self._event
        ts = t
        ev(ts, u, "app_open" if u.fmt == _FMT_MS else "session_start")
        if rand() < LOGIN_P:
            ts += sec * (1 + 10 * rand())
            ev(ts, u, "login")
        for _ in range(int(rng.expovariate(0.3))):
            ts += sec * (3 + rng.expovariate(0.025))
            ev(ts, u, "page_view")
        if rand() < u.buy_p:
            ts += sec * (10 + 120 * rand())
            if rand() < 0.6:
                cents = PRICE_POINTS[int(rand() * len(PRICE_POINTS))]
            else:
                cents = max(100, int(math.exp(rng.gauss(3.3, 0.7)) * 100))
            seq = ev(ts, u, "purchase", {"amount": _money(cents)})
            u.purchases.append((seq, cents))
            if len(u.purchases) > 5:
                del u.purchases[0]
            self.stats["purchases"] += 1
        elif u.purchases and rand() < REFUND_P:
            ts += sec * (5 + 60 * rand())
            seq, cents = u.purchases.pop(int(rand() * len(u.purchases)))
            if rand() < 0.2:  # partial refund
                cents = max(1, cents // 2)
            ev(ts, u, "refund", {"amount": _money(cents), "refund_of": f"{self.seed}-{seq}"})
            self.stats["refunds"] += 1
        if rand() < u.invite_p:
            ts += sec * (5 + 30 * rand())
            ev(ts, u, "invite")
            self.stats["invites"] += 1
            if rand() < INVITE_ACCEPT_P:
                self._push(ts + self.day * (0.01 + rng.expovariate(1 / 1.5)), _REFERRAL, u)
        # next session: exponential gap at the decayed rate; long gaps are lapses
        day = self.day
        rate = u.e0 * math.exp(-u.k * (t - u.anchor) / day)
        gap = rng.expovariate(rate) if rate > 1e-9 else math.inf
        if gap > LAPSE_DAYS:
            self.stats["lapsed"] += 1
            if rand() >= WINBACK_P:
                return  # gone for good: silent, sleeping, churned, dead
            gap = rng.uniform(WINBACK_MIN_DAYS, WINBACK_MAX_DAYS)
            u.e0 = max(0.05, u.e0 * 0.7)
            u.anchor = t + gap * day
            self.stats["won_back"] += 1
        elif gap < MIN_GAP_DAYS:
            gap = MIN_GAP_DAYS + gap
        tn = ts + gap * day
        frac = (tn / day) % 1.0
        if 0.04 < frac < 0.25 and rand() < 0.6:  # 01:00-06:00: mostly moved to the morning
            tn += (0.27 - frac + 0.25 * rand()) * day
        self._push(tn, _SESSION, u)


def _sort_key(ev: tuple) -> tuple[int, int]:
    return ev[0], ev[1]


def _ts_key(ev: tuple) -> int:
    return ev[0]


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


# ------------------------------------------------------------------ histories
def time_scale_for(rate: float, users: int, seed: int = 0, warmup_days: float = 120.0,
                   probe_days: float = 2.0) -> float:
    """The ``time_scale`` at which ``Simulator(seed, users, warmup_days=...)`` emits ~``rate`` events/s.

    Runs a probe (same seed, same warm-up) over ``probe_days`` simulated days:
    the model's event count per simulated day does not depend on the scale.
    """
    probe = Simulator(seed, users=users, warmup_days=warmup_days)
    per_day = len(probe.raw_between(0, int(probe_days * DAY_MS))) / probe_days
    per_day = per_day or EVENTS_PER_USER_DAY * users
    return rate * 86_400 / per_day


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
