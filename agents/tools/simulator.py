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

JSON-lines histories with bad lines, duplicates and disorder are made from
this model by :mod:`agents.tools.datasets`.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import orjson

__all__ = [
    "ARRIVAL_DAYS",
    "DAY_MS",
    "DEFAULT_CHANNELS",
    "EVENTS_PER_USER_180D",
    "EVENTS_PER_USER_DAY",
    "Simulator",
    "time_scale_for",
]

DAY_MS = 86_400_000
ARRIVAL_DAYS = 90.0  # ``users`` users arrive per this many simulated days

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


# ------------------------------------------------------------------ calibration
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
