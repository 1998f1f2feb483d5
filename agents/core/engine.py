"""The per-partition engine: dedup, lateness, ordering, lifecycle and periods.  Pure.

One :class:`PartitionEngine` owns the state of one input partition.  Events are
*offered* in arrival order; each is accepted, or refused as a duplicate or as
late.  Accepted events wait in a reorder buffer until the watermark passes
them, and are then applied in event-time order ``(ts, event_id)``.  Because of
that, the state only depends on the *set* of accepted events, never on their
arrival order or on how they were batched.

Watermark: ``wm = max(max accepted ts - lateness, clock - lateness, marker)``.
An event with ``ts < wm`` is late.  Everything strictly before ``wm`` is final:
buffered events with ``ts < wm`` are applied, and lifecycle entries at instants
``< wm`` are emitted.  Each day boundary the watermark crosses closes the
periods (of every grain) that end there; their numbers go to the outbox.

The engine never does I/O.  The agent that hosts it persists, for each batch,
exactly the inputs that changed it (see :class:`kpimon.agents.core.batch.Record`), so
replaying those records rebuilds the same state after a crash.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left, insort
from collections.abc import Callable
from dataclasses import dataclass, field
from heapq import heappop, heappush

from kpimon.agents.core.dedup import DedupStore, MemoryDedup
from kpimon.agents.core.effects import EFFECTS, add_flows
from kpimon.agents.core.grains import EPOCH_ORD, GRAINS, Period
from kpimon.agents.core.lifecycle import ACTIVE, CHURNED, DEAD, STATES, Ladder, Thresholds
from kpimon.agents.core.metrics import ENTERED, PeriodMetrics
from kpimon.agents.core.periods import Calendar
from kpimon.streams.events import SIGNUP, Event

NEVER = -(2**62)  # "minus infinity" for timestamps; compares as an int
DAY = 86_400_000
WINDOWS = (DAY, 7 * DAY, 30 * DAY)
WINDOW_NAMES = ("1d", "7d", "30d")

ACCEPTED, DUPLICATE, LATE = 0, 1, 2

# Event codes whose only effect once the watermark passes them is the activity itself (their flows were applied
# on arrival): the fast path of _process_until.
PLAIN = frozenset(code for code, eff in enumerate(EFFECTS) if not eff.signup and not eff.purchase and not eff.invites)

# A user's state is one int: bits 0-41 the last activity (epoch ms, until 2109), bit 42
# "first signup applied", bits 43-59 the local day of the first signup (days since 1970-01-01, plus 1;
# 0: not recorded, before an upgrade), bit 60 "the first signup had a referrer", bits 61-87 the minute of the
# last purchase + 1 (0: never; until 2225), bits 88-104 the local day of the last invite + 1 (0: never).
# Period starts are whole minutes, so a purchase minute compares exactly with them.  A user who was never
# referred, never purchased and never invited fits 60 bits (CPython's two-digit int, 32 bytes); the others
# take 3 or 4 digits (48 bytes either way, pymalloc rounds to 16).
LAST = (1 << 42) - 1
SIGNED = 1 << 42
SD_SHIFT = 43
SD_MASK = (1 << 17) - 1
HIGH_SHIFT = 60  # checkpoints store a state as two ints split here (msgpack's ints are 64-bit)
LOW = (1 << HIGH_SHIFT) - 1
REFERRED = 1 << 60
PURCHASE_SHIFT = 61
PURCHASE_MASK = ((1 << 27) - 1) << PURCHASE_SHIFT
INVITE_SHIFT = 88
MINUTE = 60_000
COHORT_GRAINS = (1, 2)  # indices in GRAINS: signup cohorts by ISO week and by month
# A pending event is one int, (ts << TS_SHIFT) | code (codes below 8), so ints sort as (ts, code), and a
# user's several pending events fit an array of 64-bit ints.  Its flows (amounts) are applied on arrival.
TS_SHIFT = 3
CODE_MASK = 7
assert (LAST << TS_SHIFT) | CODE_MASK < 2**63


def _sd_of(ordinal: int) -> int:
    """A local day's number in a user's state (SD_SHIFT): days since 1970-01-01, plus 1."""
    return ordinal - EPOCH_ORD + 1


def fresh_slots(n: int) -> int:
    """How many entries a dict copied from one of ``n`` keys holds before CPython grows its table.

    ``dict(d)`` sizes the table to the smallest power of two >= (3n+1)/2 and can use 2/3 of it
    (CPython 3.11-3.13, checked by tests/unit/core/test_zone_tables.py).  Every insert takes an entry, and
    a deleted key's entry stays taken until the table is rebuilt: a user moved to the end of a zone takes
    one more.  When none is left CPython doubles the table instead (2^19 -> 2^20 slots at 250k users).
    """
    need = (3 * n + 1) // 2
    size = 8
    while size < need:
        size <<= 1
    return (size << 1) // 3


@dataclass(frozen=True)
class EngineConfig:
    calendar: Calendar
    thresholds: Thresholds
    lateness: int
    dedup_horizon: int
    channel_label: Callable[[str | None], str] = lambda ch: ch or "unknown"
    fingerprint: str = ""  # of every setting that changes what the state means (see from_settings)
    retention_days: tuple[int, ...] = (1, 7, 30)
    cohort_horizon: int = 12
    activation_days: int = 7

    @classmethod
    def from_settings(cls, settings) -> EngineConfig:
        meaning: tuple = (settings.timezone, settings.lateness, settings.dedup_horizon,
                          settings.lifecycle.thresholds, settings.money.decimals, settings.channels)
        days, window = settings.retention.days, settings.activation.window_days
        if days != cls.retention_days or window != cls.activation_days:
            # The state holds eligible counts per N and W for days ahead.  (The defaults add nothing, so the
            # checkpoints of a version before retention keep their fingerprint.)
            meaning += (days, window)
        return cls(
            retention_days=days,
            activation_days=window,
            cohort_horizon=settings.retention.cohort_horizon,
            calendar=Calendar(settings.timezone),
            thresholds=Thresholds(*settings.lifecycle.thresholds),
            lateness=settings.lateness,
            dedup_horizon=settings.dedup_horizon,
            channel_label=settings.channel_label,
            fingerprint=hashlib.sha256(repr(meaning).encode()).hexdigest()[:16],
        )


@dataclass
class Closed:
    """A period's numbers from one partition, final once emitted."""

    period: Period
    metrics: PeriodMetrics


@dataclass
class Totals:
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def add_rejected(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n


class PartitionEngine:
    def __init__(self, cfg: EngineConfig, dedup: DedupStore | None = None) -> None:
        self.cfg = cfg
        self.cal = cfg.calendar
        self.th = cfg.thresholds
        self.lateness = cfg.lateness
        self.ladder = Ladder.build(cfg.thresholds, WINDOWS)
        self.max_ts = NEVER
        self.wm = NEVER
        self.cursor: int | None = None  # everything before it has been applied
        # Accepted events the watermark has not passed yet, per user, as what their order decides: one
        # int per event, (ts << TS_SHIFT) | code -- the int alone for a user's only pending event, else
        # an ascending array of 64-bit ints (8 bytes per event; ~300 for an event in a global buffer).
        # What commutes was applied on arrival: flows go to the day of their ts (``_add_flows``), and
        # identical non-signup instants of a user are kept once.  Signups keep what the first signup
        # needs apart.  Users are indexed by the second of their earliest pending instant (``_due``,
        # and a heap of those seconds), so the users a watermark reaches are found without a scan.
        self.pending: dict[str, int | array] = {}
        self.pending_signups: dict[str, list[tuple[int, str, str | None, str | None]]] = {}
        self._due: dict[int, list[str]] = {}
        self._due_keys: list[int] = []
        # Accepted event ids within the dedup horizon (agents/core/dedup.py): in memory by default,
        # on disk in the worker (agents/worker/dedup_store.py).
        self.dedup_store: DedupStore = dedup if dedup is not None else MemoryDedup(cfg.dedup_horizon)
        # Per-user state, kept small (docs/performance.md): every user is in exactly one
        # zone, zones[k]: user_id -> one packed int (see LAST), in order of last activity
        # (plain dicts keep insertion order; deletions leave holes that _compact removes).
        self.zones: list[dict[str, int]] = [{} for _ in self.ladder.bounds]
        self._holes: list[int] = [0] * len(self.ladder.bounds)
        # Entries each zone's table holds since the engine last rebuilt it (None: not known, grown by CPython).
        self._slots: list[int | None] = [None] * len(self.ladder.bounds)
        self.totals = Totals()
        self.outbox: list[Closed] = []
        # (from_state, to_state) -> count, drained by the exporter.
        self.transitions: dict[tuple[int, int], int] = {}
        # Lifetime net revenue (minor units) of every user who ever had a purchase or refund applied.
        self.lifetime: dict[str, int] = {}
        # Per-user changes for the serving layer (agents/serving/writer.py), only when enabled:
        # user_id -> [last activity, zone, first signup ts | None, channel | None, lifetime net revenue].
        self.track_users = False
        self.touched: dict[str, list] = {}
        # The open period of each grain and its accumulator.  Additive metrics
        # live on the day accumulator only and roll up when the day closes.
        self._periods: list[Period] = []
        self._accs: list[PeriodMetrics] = []
        self._prev_starts: list[int] = []  # the start of the period before each open one
        # Flows of accepted events dated in days after the open one, by day start: that day's accumulator
        # starts from them when it opens.
        self.ahead: dict[int, PeriodMetrics] = {}
        # Retention and cohorts: the open day's number (as in a user's state, see SD_SHIFT), and the instant
        # from which every first signup's day is recorded (NEVER: always; after a restore from a checkpoint
        # written before signup days were, its cursor): a cohort or an N-day retention whose signups began
        # earlier is unknown (PeriodMetrics.retention).
        self._sd = 0
        self.cohorts_since = NEVER
        self._cohort_labels: dict[int, tuple[str, ...]] = {}  # signup day -> its cohorts' labels
        self._start_sds: list[int] = []  # the first day of each open period (as a signup day number)
        self._max_n = max(cfg.retention_days)
        # Revenue (signed minor units) of accepted purchases and refunds by user and pending instant, until the
        # instant is applied: then it is referred revenue if the user's first signup had a referrer.
        self.pending_revenue: dict[str, dict[int, int]] = {}

    # ------------------------------------------------------------------ input
    def offer(self, ev: Event) -> int:
        """Decide on one event: ACCEPTED, DUPLICATE or LATE (see :meth:`offer_batch`)."""
        dups = self.totals.duplicates
        accepted, late = self.offer_batch([ev])
        if accepted:
            return ACCEPTED
        return LATE if late else DUPLICATE if self.totals.duplicates > dups else ACCEPTED

    def offer_batch(self, events: list[Event], check: bool = True) -> tuple[list[Event], list[int]]:
        """Decide on events in arrival order; returns (accepted, indices of late ones).

        An event is a duplicate if its event_id was accepted before (within the
        dedup horizon), late if its ts is below the watermark at its arrival;
        each accepted event raises the watermark for the ones after it.
        ``check=False`` takes events already known to be acceptable (replay).
        """
        store = self.dedup_store
        lateness = self.lateness
        wm, max_ts = self.wm, self.max_ts
        accepted: list[Event] = []
        late: list[int] = []
        dups = 0
        first = self.cursor is None
        if check:
            hits = store.seen([ev.event_id for ev in events])  # one batch of lookups
            taken: set[str] = set()  # ids accepted earlier in this batch
        for i, ev in enumerate(events):
            ts = ev.ts
            if check:
                eid = ev.event_id
                if hits[i] or eid in taken:
                    dups += 1
                    continue
                if ts < wm:
                    late.append(i)
                    continue
                taken.add(eid)
            accepted.append(ev)
            if ts > max_ts:
                max_ts = ts
                if ts - lateness > wm:
                    wm = ts - lateness
            if first:
                first = False
                self.cursor = wm
                self._open_periods(wm)
        if accepted:
            store.add([ev.event_id for ev in accepted], [ev.ts for ev in accepted])
            self._hold(accepted)
        self.wm, self.max_ts = wm, max_ts
        totals = self.totals
        totals.accepted += len(accepted)
        totals.duplicates += dups
        totals.late += len(late)
        return accepted, late

    def accept(self, ev: Event) -> None:
        """Take one event known to be acceptable (replay)."""
        self.offer_batch([ev], check=False)

    def advance(self, clock: int | None = None, marker: int | None = None) -> None:
        """Move the watermark (wall clock and/or an explicit marker), apply what is final."""
        if clock is not None and clock - self.lateness > self.wm:
            self.wm = clock - self.lateness
        if marker is not None and marker > self.wm:
            self.wm = marker
        if self.cursor is not None and self.cursor < self.wm:
            self._process_until(self.wm)
        self.dedup_store.expire(self.wm)

    # -------------------------------------------------------------- internals
    def _open_periods(self, instant: int) -> None:
        self._periods = list(self.cal.periods_at(instant))
        self._accs = [self.new_acc(g) for g in range(len(self._periods))]
        self.derive_prev_starts()

    def new_acc(self, g: int = 0) -> PeriodMetrics:
        """An empty accumulator for a period of grain ``GRAINS[g]`` (or an ``ahead`` day)."""
        acc = PeriodMetrics()
        acc.retention = {n: [0, 0] for n in self.cfg.retention_days}
        acc.activation = {self.cfg.activation_days: [0, 0]}
        if g in COHORT_GRAINS:
            acc.cohorts = {}
        return acc

    def derive_prev_starts(self) -> None:
        """The start of the period before each open one (growth accounting: active in the previous period)."""
        self._prev_starts = [self.cal.period_at(p.start_ms - 1, p.grain).start_ms for p in self._periods]
        self._start_sds = [_sd_of(self.cal.day_ordinal(p.start_ms)) for p in self._periods]
        self._sd = self._start_sds[0] if self._periods else 0

    @property
    def dedup(self) -> dict[str, int]:
        """Every remembered event_id and its bucket (a copy; for tests and tools, in-memory stores only)."""
        return dict(self.dedup_store.items())  # type: ignore[attr-defined]

    def _mark_due(self, uid: str, t: int) -> None:
        """Index ``uid`` under the second of ``t``, its earliest pending instant now."""
        k = t // 1000
        lst = self._due.get(k)
        if lst is None:
            self._due[k] = [uid]
            heappush(self._due_keys, k)
        else:
            lst.append(uid)

    def _add_flows(self, uid: str, t: int, code: int, amount: int) -> None:
        """Apply the flows of an accepted event at ``t`` (they commute): to its day, and to the user's lifetime."""
        if t < self._periods[0].end_ms:
            acc = self._accs[0]
        else:
            start = self.cal.day_start(t)
            acc = self._ahead(start)
        add_flows(acc, code, amount)
        revenue = EFFECTS[code].revenue
        if revenue:
            self.lifetime[uid] = self.lifetime.get(uid, 0) + revenue * amount
            # Referred revenue (from the first signup on, of users whose first signup had a referrer) is decided
            # when the watermark passes t, in event-time order, as what the user's first signup is.
            stash = self.pending_revenue.get(uid)
            if stash is None:
                stash = self.pending_revenue[uid] = {}
            item = (t << TS_SHIFT) | code
            stash[item] = stash.get(item, 0) + revenue * amount

    def _ahead(self, start: int) -> PeriodMetrics:
        """The accumulator of the day starting at ``start``, not open yet (made on first use)."""
        acc = self.ahead.get(start)
        if acc is None:
            acc = self.ahead[start] = self.new_acc()
        return acc

    def _day_start(self, sd: int) -> int:
        """The start of the day numbered ``sd`` (as in a user's state)."""
        return self.cal.periods_of_day(sd - 1 + EPOCH_ORD)[0].start_ms

    def _ahead_day(self, sd: int) -> PeriodMetrics:
        """The accumulator of the day numbered ``sd``, a day not open yet."""
        return self._ahead(self._day_start(sd))

    def _signed_up(self, sd: int, purchased_today: bool) -> None:
        """A first signup on the open day (``sd``): eligible for N-day retention N days later and for activation
        W days later (converted already if the user purchased earlier today), and in its cohorts at offset 0
        (active in its own week and month)."""
        for n in self.cfg.retention_days:
            self._ahead_day(sd + n).retention[n][0] += 1  # type: ignore[index]
        w = self.cfg.activation_days
        counts = self._ahead_day(sd + w).activation[w]  # type: ignore[index]
        counts[0] += 1
        if purchased_today:
            counts[1] += 1
        for g in COHORT_GRAINS:
            counts = self._accs[g].cohorts
            label = self._periods[g].label
            counts[label] = counts.get(label, 0) + 1  # type: ignore[union-attr,index]

    def _purchased_in_window(self, sd: int, lp: int) -> None:
        """A purchase within the activation window of a signup on day ``sd``, the previous one at ``lp``: the first
        such purchase converts the user (a previous one on or after the signup day already did)."""
        if lp < self._day_start(sd):
            w = self.cfg.activation_days
            self._ahead_day(sd + w).activation[w][1] += 1  # type: ignore[index]

    def _cohorts_of(self, sd: int) -> tuple[str, ...]:
        """The labels of the cohorts (COHORT_GRAINS) of a signup day."""
        labels = self._cohort_labels.get(sd)
        if labels is None:
            if len(self._cohort_labels) > 4096:
                self._cohort_labels.clear()
            periods = self.cal.periods_of_day(sd - 1 + EPOCH_ORD)
            labels = self._cohort_labels[sd] = tuple(periods[g].label for g in COHORT_GRAINS)
        return labels

    def _hold(self, events: list[Event]) -> None:
        """Apply what commutes now; keep the rest as per-user pending instants until the watermark passes them."""
        pending, signups = self.pending, self.pending_signups
        for ev in events:
            uid = ev.user_id
            t = ev.ts
            code = ev.code
            if EFFECTS[code].flows:
                self._add_flows(uid, t, code, ev.amount)
            item = (t << TS_SHIFT) | code
            cur = pending.get(uid)
            if cur is None:
                pending[uid] = item
                self._mark_due(uid, t)
            elif isinstance(cur, int):
                if item == cur and code != SIGNUP:
                    pass  # the same instant again: applying it twice changes nothing
                elif item >= cur:
                    pending[uid] = array("q", (cur, item))
                else:
                    pending[uid] = array("q", (item, cur))
                    self._mark_due(uid, t)
            elif item > cur[-1]:
                cur.append(item)  # the common case: a user's events come in order
            elif item == cur[-1] and code != SIGNUP:
                pass
            else:
                insort(cur, item)
                if cur[0] == item:
                    self._mark_due(uid, t)
            if code == SIGNUP:
                insort(signups.setdefault(uid, []), (t, ev.event_id, ev.channel, ev.referrer_id))

    def _process_until(self, target: int) -> None:
        due, keys, pending = self._due, self._due_keys, self.pending
        pending_revenue = self.pending_revenue
        cursor = self.cursor
        assert cursor is not None
        z0 = self.zones[0]
        bounds = self.ladder.bounds
        gap = bounds[1] if len(bounds) > 1 else LAST  # a longer gap between two activities enters a state
        track = self.track_users
        while cursor < target:
            boundary = self._periods[0].end_ms
            day_start = self._periods[0].start_ms
            step_end = boundary if boundary < target else target
            short = step_end - cursor <= gap  # no gap between two instants of the step enters a state
            bound = step_end << TS_SHIFT
            movers: list[str] = []
            later: dict[str, int] = {}  # indexed users whose earliest instant is not below step_end
            while keys and keys[0] * 1000 < step_end:
                k = heappop(keys)
                for uid in due.pop(k):
                    cur = pending.get(uid)
                    if cur is None:
                        continue
                    first = cur if isinstance(cur, int) else cur[0]
                    if (first >> TS_SHIFT) // 1000 != k:
                        continue  # stale: indexed again under its current earliest instant
                    if first >= bound:
                        later[uid] = k
                        continue
                    items: list[int] | array
                    if isinstance(cur, int):
                        del pending[uid]
                        items = [cur]
                    else:
                        cut = bisect_left(cur, bound)
                        items = cur[:cut]
                        if cut == len(cur):
                            del pending[uid]
                        else:
                            del cur[:cut]  # in place
                            if len(cur) == 1:
                                pending[uid] = cur[0]
                            self._mark_due(uid, cur[0] >> TS_SHIFT)
                    movers.append(uid)
                    # The common case in live mode: plain activities of a user of zone 0 who was already active
                    # today, soon after the last one (and after one another: the step is short): they only move
                    # the last activity.  What _instant would do, without its lookups.
                    v = z0.get(uid)
                    if v is not None and (not pending_revenue or uid not in pending_revenue):
                        a = v & LAST
                        if a >= day_start and (items[0] >> TS_SHIFT) - a <= gap and (short or len(items) == 1):
                            for item in items:
                                if item & CODE_MASK not in PLAIN:
                                    break
                            else:
                                t = items[-1] >> TS_SHIFT
                                if t > a:
                                    z0[uid] = v - a + t
                                if track:
                                    self._touch(uid, t, None, False)
                                continue
                    self._apply_user(uid, items)
            for uid, k in later.items():
                self._mark_due(uid, k * 1000)  # due in that second, after step_end: put back after the scan
            if movers:
                # The users just applied go to the end of zone 0 in order of last activity (zones stay ordered
                # by it; ties by user id), as one sorted run.
                z0 = self._compact(0, len(movers))
                if len(movers) > 1:
                    movers = [uid for _, uid in sorted([(z0[uid] & LAST, uid) for uid in movers])]
                for uid in movers:
                    z0[uid] = z0.pop(uid)
                self._holes[0] += len(movers)
            self._age(step_end)
            z0 = self.zones[0]
            cursor = self.cursor = step_end
            if step_end == boundary:
                self._close(boundary)

    def _find(self, uid: str) -> tuple[int, int | None]:
        """(zone, packed state) of a user; (-1, None) if unknown.  Zone 0 is tried first."""
        for k, zone in enumerate(self.zones):
            v = zone.get(uid)
            if v is not None:
                return k, v
        return -1, None

    def _enter(self, frm: int, to: int, n: int = 1) -> None:
        """Count ``n`` users' lifecycle entries from ``frm`` to ``to``, inside the current day."""
        acc = self._accs[0]
        transitions = self.transitions
        for s in range(frm + 1, to + 1):
            name = ENTERED[s - 1]
            setattr(acc, name, getattr(acc, name) + n)
            key = (s - 1, s)
            transitions[key] = transitions.get(key, 0) + n

    def _apply_user(self, uid: str, items: list[int] | array) -> None:
        """Apply ``uid``'s pending events ``items`` (ascending), as the watermark passed them."""
        signups = None
        for item in items:
            code = item & CODE_MASK
            signup = None
            if code == SIGNUP:
                if signups is None:
                    signups = self.pending_signups[uid]
                signup = signups.pop(0)  # in (ts, event_id) order: the first one applied counts
                if not signups:
                    del self.pending_signups[uid]
            self._instant(uid, item >> TS_SHIFT, code, signup)

    def _instant(self, uid: str, t: int, code: int, signup: tuple[int, str, str | None, str | None] | None) -> None:
        """Apply one event of ``uid`` at ``t`` (``signup``: its details, for a signup)."""
        accs = self._accs
        periods = self._periods
        day = accs[0]
        zones = self.zones
        z0 = zones[0]
        v = z0.get(uid)
        zone = 0
        if v is None:
            zone, v = self._find(uid)
        if v is None:
            v = z0[uid] = t
            for acc in accs:
                acc.active_users += 1
                acc.first_active += 1
        else:
            a = v & LAST
            if t > a:
                bounds = self.ladder.bounds
                # Entries due after the last scan but before this activity (zone 0 users too).
                if zone or (len(bounds) > 1 and a + bounds[1] < t):
                    self._comeback(zone, a, t, day)
                if zone:
                    del zones[zone][uid]  # into zone 0 (moved to its end in order of activity by _process_until)
                    self._holes[zone] += 1
                v = z0[uid] = v - a + t
                if a < periods[0].start_ms:  # first activity today; ISO weeks straddle months
                    prev = self._prev_starts
                    for g, acc in enumerate(accs):
                        if a < periods[g].start_ms:
                            acc.active_users += 1
                            # growth accounting: was the user active in the previous period of this grain?
                            if a >= prev[g]:
                                acc.retained += 1
                            else:
                                acc.resurrected += 1
                    sd = (v >> SD_SHIFT) & SD_MASK
                    if sd:
                        # N-day retention: active on the Nth day after the signup day.
                        if self._sd - sd <= self._max_n:
                            counts = day.retention.get(self._sd - sd)  # type: ignore[union-attr]
                            if counts is not None:
                                counts[1] += 1
                        # Cohorts: active in this week / month for the first time.
                        if a < periods[1].start_ms or a < periods[2].start_ms:
                            for g, label in zip(COHORT_GRAINS, self._cohorts_of(sd)):
                                if a < periods[g].start_ms:
                                    cohorts = accs[g].cohorts
                                    cohorts[label] = cohorts.get(label, 0) + 1  # type: ignore[union-attr,index]
        # The user is in zone 0 now, with state v.  What the event does (agents/core/effects.py), but for
        # its flows, applied on arrival.
        eff = EFFECTS[code]
        first_signup = False
        if eff.revenue and self.pending_revenue:
            self._decide_revenue(uid, t, code, v, day)
        if eff.purchase:
            lpm = (v & PURCHASE_MASK) >> PURCHASE_SHIFT
            lp = (lpm - 1) * MINUTE if lpm else NEVER
            if not lpm and day.first_purchases is not None:  # None: the day was open across an upgrade
                day.first_purchases += 1
            sd = (v >> SD_SHIFT) & SD_MASK
            if sd and self._sd - sd < self.cfg.activation_days:
                self._purchased_in_window(sd, lp)
            if lp < periods[0].start_ms:
                for g, acc in enumerate(accs):
                    if lp < periods[g].start_ms:
                        acc.paying_users += 1
            z0[uid] = (v & ~PURCHASE_MASK) | ((t // MINUTE + 1) << PURCHASE_SHIFT)
        elif eff.signup and signup is not None:
            if not v & SIGNED:
                first_signup = True
                sd = self._sd
                v |= SIGNED
                if signup[3] is not None:
                    v |= REFERRED
                    day.referred_signups += 1
                if 0 < sd <= SD_MASK:
                    v |= sd << SD_SHIFT
                    lpm = (v & PURCHASE_MASK) >> PURCHASE_SHIFT
                    self._signed_up(sd, bool(lpm) and (lpm - 1) * MINUTE >= periods[0].start_ms)
                # (else a day outside 1970-2328: not in cohorts nor retention)
                z0[uid] = v
                day.new_users += 1
                ch = self.cfg.channel_label(signup[2])
                day.new_users_by_channel[ch] = day.new_users_by_channel.get(ch, 0) + 1
        elif eff.invites:
            # Inviters: the user's first invite in each open period (the last invite's day is in the state).
            last = v >> INVITE_SHIFT
            starts = self._start_sds
            if last < starts[0]:
                for g, acc in enumerate(accs):
                    if last < starts[g] and acc.inviters is not None:
                        acc.inviters += 1
                z0[uid] = (v & ((1 << INVITE_SHIFT) - 1)) | (self._sd << INVITE_SHIFT)
        if self.track_users:
            self._touch(uid, t, signup[2] if first_signup and signup is not None else None, first_signup)

    def _decide_revenue(self, uid: str, t: int, code: int, v: int, day: PeriodMetrics) -> None:
        """The revenue waiting at this instant (``pending_revenue``): referred if the user's first signup, applied
        by now (at or before ``t``), had a referrer."""
        stash = self.pending_revenue.get(uid)
        if stash is None:
            return
        amount = stash.pop((t << TS_SHIFT) | code, None)
        if not stash:
            del self.pending_revenue[uid]
        if amount is not None and v & REFERRED and day.referred_revenue is not None:
            day.referred_revenue += amount

    def _touch(self, uid: str, t: int, channel: str | None, first_signup: bool) -> None:
        rec = self.touched.get(uid)
        if rec is None:
            rec = self.touched[uid] = [t, 0, None, None, 0]
        rec[0], rec[1] = t, 0
        if first_signup:
            rec[2], rec[3] = t, channel
        rec[4] = self.lifetime.get(uid, 0)

    def _comeback(self, zone: int, a: int, t: int, day: PeriodMetrics) -> None:
        """A user last active at ``a`` (in ``zone``) is active again at ``t``."""
        bounds = self.ladder.bounds
        states = self.ladder.state
        k = zone
        while k + 1 < len(bounds) and a + bounds[k + 1] < t:
            k += 1
        before = states[k]
        self._enter(states[zone], before)
        if before != ACTIVE:
            key = (before, ACTIVE)
            self.transitions[key] = self.transitions.get(key, 0) + 1
            gap = t - a
            if gap > self.th.dead:
                day.won_back_dead += 1
            elif gap > self.th.churned:
                day.won_back_churned += 1

    def _compact(self, k: int, upcoming: int = 0) -> dict[str, int]:
        """Rebuild zone k when its deleted entries are worth it, before ``upcoming`` inserts.

        Each insert and each move to the end takes an entry of the dict's table, and deletions free none, so
        the table fills.  When it is full CPython doubles it (the zone-0 table of 250k users goes from 7.3 to
        14.7 MiB) and the engine's rebuild halves it again later: a swing of the whole table, in step across
        partitions (docs/performance.md).  So a zone is rebuilt *before* its next inserts would fill the
        table, if the rebuilt table then leaves room for at least an eighth of its users (a rebuild per
        eighth is then the most it costs, ~30 ns per entry); else, near a power of two, CPython grows it
        and the engine rebuilds once deletions left as many holes as the zone has users (amortized O(1)).
        """
        zone = self.zones[k]
        holes = self._holes[k]
        if not holes:
            return zone
        n = len(zone)
        slots = self._slots[k]
        rebuild = holes > n + 1024
        if not rebuild and slots is not None and n + holes + upcoming > slots:
            fresh = fresh_slots(n)
            if fresh - n - upcoming >= n >> 3:
                rebuild = True
            else:
                self._slots[k] = None  # CPython grows it now
        if rebuild:
            zone = self.zones[k] = dict(zone)
            self._holes[k] = 0
            self._slots[k] = fresh_slots(n)
        return zone

    def _age(self, limit: int) -> None:
        """Move users whose inactivity crosses a zone bound before ``limit``."""
        bounds = self.ladder.bounds
        states = self.ladder.state
        zones = self.zones
        for k in range(1, len(bounds)):
            if not zones[k - 1]:
                continue
            src = self._compact(k - 1)
            dst = zones[k]
            cutoff = limit - bounds[k]  # users whose last activity is before it move
            moving = []
            for item in src.items():
                if (item[1] & LAST) >= cutoff:
                    break
                moving.append(item)
            if moving:
                for uid, v in moving:
                    del src[uid]
                    dst[uid] = v
                self._holes[k - 1] += len(moving)
                if self.track_users and states[k] != states[k - 1]:
                    touched = self.touched
                    for uid, v in moving:
                        rec = touched.get(uid)
                        if rec is None:
                            touched[uid] = [v & LAST, k, None, None, self.lifetime.get(uid, 0)]
                        else:
                            rec[1] = k
                if states[k] != states[k - 1]:
                    self._enter(states[k - 1], states[k], len(moving))

    def population(self) -> list[int]:
        """Users per lifecycle state as of the last scan (just before ``cursor``)."""
        pop = [0] * len(STATES)
        for k, zone in enumerate(self.zones):
            pop[self.ladder.state[k]] += len(zone)
        return pop

    def active_in_windows(self) -> list[int]:
        """Distinct users active within 1d, 7d, 30d before the cursor."""
        return [sum(len(self.zones[k]) for k in range(n)) for n in self.ladder.window_zones]

    def _close(self, boundary: int) -> None:
        pop = self.population()
        periods, accs = self._periods, self._accs
        day = accs[0]
        for g in range(1, len(GRAINS)):
            accs[g].add_additive(day)
        prev_starts = self._prev_starts
        for g, (period, acc) in enumerate(zip(periods, accs)):
            if period.end_ms == boundary:
                acc.population = list(pop)
                self._final_cohorts(g, period, acc)
                self.outbox.append(Closed(period, acc))
                periods[g] = self.cal.period_at(boundary, GRAINS[g])
                prev_starts[g] = period.start_ms
                self._start_sds[g] = _sd_of(self.cal.day_ordinal(boundary))
                nxt = accs[g] = self.new_acc(g)
                if g == 0:
                    # The new day starts with the flows that arrived for it before it opened.
                    nxt = accs[0] = self.ahead.pop(periods[0].start_ms, nxt)
                    self._sd = _sd_of(self.cal.day_ordinal(periods[0].start_ms))
                nxt.prev_active = acc.active_users

    def _final_cohorts(self, g: int, period: Period, acc: PeriodMetrics) -> None:
        """A closing period's retention and cohorts as they are final: the N-day retentions and the cohorts
        whose signups were all recorded (``cohorts_since``), a cohort count for each of the ``cohort_horizon``
        + 1 latest cohorts (0 included)."""
        since = self.cohorts_since
        cal = self.cal
        if since != NEVER:
            first = cal.day_ordinal(period.start_ms)  # eligible users signed up from day first - N on
            for name in ("retention", "activation"):
                counts = getattr(acc, name)
                if counts is not None:
                    setattr(acc, name, {n: v for n, v in counts.items()
                                        if cal.periods_of_day(first - n)[0].start_ms >= since})
        if g not in COHORT_GRAINS:
            acc.cohorts = None
            return
        counts = acc.cohorts or {}
        known = {}
        cohort = period
        for _ in range(self.cfg.cohort_horizon + 1):
            if cohort.start_ms < since:
                break
            known[cohort.label] = counts.get(cohort.label, 0)
            cohort = cal.period_at(cohort.start_ms - 1, cohort.grain)
        acc.cohorts = known

    # ---------------------------------------------------------------- queries
    def open_metrics(self) -> list[tuple[Period, PeriodMetrics]]:
        """The open period of each grain with its numbers so far (live gauges)."""
        if not self._periods:
            return []
        day = self._accs[0]
        out = [(self._periods[0], day.combined(PeriodMetrics()))]
        for period, acc in zip(self._periods[1:], self._accs[1:]):
            out.append((period, acc.combined(day)))
        pop = self.population()
        for _, m in out:
            m.population = list(pop)
        return out

    def pending_items(self) -> list[tuple[str, list[int]]]:
        """Every user's pending ints, ascending, by user."""
        return [(uid, [cur] if isinstance(cur, int) else list(cur)) for uid, cur in sorted(self.pending.items())]

    def pending_count(self) -> int:
        """How many pending instants wait for the watermark (identical ones of a user count once)."""
        return sum(1 if isinstance(cur, int) else len(cur) for cur in self.pending.values())

    def pending_state(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """Every user's pending instants as (ts, code), by user (tests, tools)."""
        return [(uid, [(i >> TS_SHIFT, i & CODE_MASK) for i in items]) for uid, items in self.pending_items()]

    def user_count(self) -> int:
        return sum(len(z) for z in self.zones)

    def users_state(self) -> dict[str, tuple[int, int, bool, int | None]]:
        """Every user's (zone, last activity, signed up, last purchase); for tests and tools."""
        out = {}
        for k, zone in enumerate(self.zones):
            for uid, v in zone.items():
                lpm = (v & PURCHASE_MASK) >> PURCHASE_SHIFT
                out[uid] = (k, v & LAST, bool(v & SIGNED), (lpm - 1) * MINUTE if lpm else None)
        return out

    def touch_all(self) -> None:
        """Mark every user as changed, for the serving layer to rewrite them all (after a restore from a
        checkpoint, whose users' first-signup details are not part of the engine state)."""
        touched, lifetime = self.touched, self.lifetime
        for k, zone in enumerate(self.zones):
            for uid, v in zone.items():
                if uid not in touched:
                    touched[uid] = [v & LAST, k, None, None, lifetime.get(uid, 0)]

    def take_touched(self) -> dict[str, list]:
        out, self.touched = self.touched, {}
        return out

    def take_outbox(self) -> list[Closed]:
        out, self.outbox = self.outbox, []
        return out

    def take_transitions(self) -> dict[tuple[int, int], int]:
        out, self.transitions = self.transitions, {}
        return out


__all__ = [
    "ACCEPTED",
    "DUPLICATE",
    "LATE",
    "NEVER",
    "WINDOWS",
    "WINDOW_NAMES",
    "Closed",
    "EngineConfig",
    "PartitionEngine",
    "Totals",
    "CHURNED",
    "DEAD",
]
