"""Per-period metric accumulators: initialize / add / merge / result.  Pure.

One :class:`PeriodMetrics` holds one partition's (or the merged) numbers of one
calendar period.  Money is an int of minor currency units, never a float.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from kpimon.agents.core.lifecycle import STATES

# Counts that add up over days (a month's orders = the sum of its days' orders).
ADDITIVE = (
    "new_users",
    "orders",
    "revenue",
    "refunds",
    "invites",
    "referred_signups",
    "entered_silent",
    "entered_sleeping",
    "entered_churned",
    "entered_dead",
    "won_back_churned",
    "won_back_dead",
)
# Counts that add up over days too, added after numbers were first written: ``None`` (unknown) in numbers written
# before they existed, and in any sum with such numbers.
LATER_ADDITIVE = ("first_purchases", "referred_revenue")
# Likewise for distinct-user counts.
LATER_DISTINCT = ("inviters",)
LATER = (*LATER_ADDITIVE, *LATER_DISTINCT)
# Distinct-user counts, counted per grain directly.
DISTINCT = ("active_users", "paying_users")
# Growth accounting, per grain: the active users split by what they did in the previous period of that grain
# (first activity ever / active then too / not), and the active users of that previous period (carried over
# when it closes).  Dormant = prev_active - retained.  Numbers written by earlier versions
# lack them (``growth`` False: the period's growth is unknown, never zero).
GROWTH = ("first_active", "retained", "resurrected", "prev_active")
RATIO_DECIMALS = QUICK_RATIO_DECIMALS = 4
# N-day retention (``retention``: N -> [eligible, retained], additive over days) and the signup-cohort counts
# of a week or month (``cohorts``: cohort label -> its users active in the period).  The keys present are
# the known ones: one a partition cannot know (its users' signup days were not recorded before an upgrade)
# is absent, and a sum or merge keeps the keys every part knows.  ``None`` is the neutral element: no
# numbers of this kind here (a bare accumulator, a grain without cohorts).  Numbers written before they
# existed have none known.
ENTERED = ("entered_silent", "entered_sleeping", "entered_churned", "entered_dead")  # index = state - 1


class PeriodMetrics:
    """Accumulator of one period.  Plain attributes: the engine bumps them inline."""

    __slots__ = (*ADDITIVE, *LATER, *DISTINCT, *GROWTH, "growth", "population", "new_users_by_channel",
                 "retention", "activation", "cohorts")

    # Declarations only (no class values, so no clash with __slots__): the counters are set
    # by name in __init__ from ADDITIVE / DISTINCT, which a type checker cannot follow.
    new_users: int
    orders: int
    revenue: int
    refunds: int
    invites: int
    referred_signups: int
    first_purchases: int | None
    referred_revenue: int | None
    inviters: int | None
    entered_silent: int
    entered_sleeping: int
    entered_churned: int
    entered_dead: int
    won_back_churned: int
    won_back_dead: int
    active_users: int
    paying_users: int
    first_active: int
    retained: int
    resurrected: int
    prev_active: int

    def __init__(self) -> None:
        for name in (*ADDITIVE, *LATER, *DISTINCT, *GROWTH):
            setattr(self, name, 0)
        self.growth = True  # the growth counts cover the whole period
        self.population: list[int] = [0] * len(STATES)
        self.new_users_by_channel: dict[str, int] = {}
        self.retention: dict[int, list[int]] | None = None
        self.activation: dict[int, list[int]] | None = None  # W -> [eligible, converted], as retention
        self.cohorts: dict[str, int] | None = None

    def add_additive(self, other: PeriodMetrics) -> None:
        """Roll a finer period (a closed day) into this coarser one."""
        for name in ADDITIVE:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for ch, n in other.new_users_by_channel.items():
            self.new_users_by_channel[ch] = self.new_users_by_channel.get(ch, 0) + n
        self.retention = _sum_retention(self.retention, other.retention)
        self.activation = _sum_retention(self.activation, other.activation)
        for name in LATER_ADDITIVE:
            setattr(self, name, _sum_optional(getattr(self, name), getattr(other, name)))

    def merge(self, other: PeriodMetrics) -> PeriodMetrics:
        """Sum of two partitions' numbers for the same period (users are partitioned)."""
        out = PeriodMetrics()
        for name in (*ADDITIVE, *DISTINCT, *GROWTH):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.growth = self.growth and other.growth
        out.population = [a + b for a, b in zip(self.population, other.population)]
        chans = dict(self.new_users_by_channel)
        for ch, n in other.new_users_by_channel.items():
            chans[ch] = chans.get(ch, 0) + n
        out.new_users_by_channel = chans
        out.retention = _sum_retention(self.retention, other.retention)
        out.activation = _sum_retention(self.activation, other.activation)
        out.cohorts = _sum_known(self.cohorts, other.cohorts)
        for name in LATER:
            setattr(out, name, _sum_optional(getattr(self, name), getattr(other, name)))
        return out

    def combined(self, other: PeriodMetrics) -> PeriodMetrics:
        """This coarse period's rolled-up days plus the open day ``other`` (live gauges)."""
        out = PeriodMetrics()
        for name in ADDITIVE:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in (*DISTINCT, *GROWTH):
            setattr(out, name, getattr(self, name))
        out.growth = self.growth
        out.population = list(self.population)
        out.new_users_by_channel = dict(self.new_users_by_channel)
        out.retention = _sum_retention(self.retention, other.retention)
        out.activation = _sum_retention(self.activation, other.activation)
        out.cohorts = None if self.cohorts is None else dict(self.cohorts)
        for name in LATER_ADDITIVE:
            setattr(out, name, _sum_optional(getattr(self, name), getattr(other, name)))
        for name in LATER_DISTINCT:
            setattr(out, name, getattr(self, name))
        return out

    # -- wire form (partials between worker and aggregator, state snapshots) --
    def to_wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in (*ADDITIVE, *DISTINCT)}
        if self.growth:
            for name in GROWTH:
                data[name] = getattr(self, name)
        for name in LATER:
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        data["population"] = list(self.population)
        data["new_users_by_channel"] = dict(sorted(self.new_users_by_channel.items()))
        for name in ("retention", "activation"):
            counts = getattr(self, name)
            data[name] = None if counts is None else {str(n): list(v) for n, v in sorted(counts.items())}
        data["cohorts"] = None if self.cohorts is None else dict(sorted(self.cohorts.items()))
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> PeriodMetrics:
        out = cls()
        for name in (*ADDITIVE, *DISTINCT):
            setattr(out, name, int(data[name]))
        out.growth = all(name in data for name in GROWTH)  # written before growth accounting: unknown
        if out.growth:
            for name in GROWTH:
                setattr(out, name, int(data[name]))
        for name in LATER:  # absent: written before it existed, unknown
            setattr(out, name, None if data.get(name) is None else int(data[name]))
        out.population = [int(x) for x in data["population"]]
        out.new_users_by_channel = {str(k): int(v) for k, v in data["new_users_by_channel"].items()}
        # Absent: written before retention and cohorts, none known; null: none of them here (neutral).
        for name in ("retention", "activation"):
            ret = data.get(name, {})
            setattr(out, name, None if ret is None else {int(n): [int(v[0]), int(v[1])] for n, v in ret.items()})
        coh = data.get("cohorts", {})
        out.cohorts = None if coh is None else {str(k): int(v) for k, v in coh.items()}
        return out

    def is_empty(self) -> bool:
        """No event, no entry and no user at all: a period before any data."""
        return (not any(getattr(self, n) for n in (*ADDITIVE, *LATER, *DISTINCT, *GROWTH))
                and not any(self.population)
                and not any(e or r for e, r in (self.retention or {}).values())
                and not any(e or c for e, c in (self.activation or {}).values())
                and not any((self.cohorts or {}).values()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeriodMetrics) and self.to_wire() == other.to_wire()

    def __repr__(self) -> str:
        return f"PeriodMetrics({self.to_wire()})"

    def result(self, warning_state: str, money: Any) -> dict[str, Any]:
        """The user-facing numbers (docs/metrics.md).  ``money`` formats minor units."""
        won_back = self.won_back_churned + self.won_back_dead
        return {
            "new_users": self.new_users,
            "active_users": self.active_users,
            "orders": self.orders,
            "paying_users": self.paying_users,
            "revenue": money(self.revenue),
            "refunds": money(self.refunds),
            "invites": self.invites,
            "referred_signups": self.referred_signups,
            "entered_silent": self.entered_silent,
            "entered_sleeping": self.entered_sleeping,
            "entered_churned": self.entered_churned,
            "entered_dead": self.entered_dead,
            "churn_warnings": getattr(self, f"entered_{warning_state}"),
            "churned": self.entered_churned,
            "won_back": won_back,
            "won_back_by_depth": {"churned": self.won_back_churned, "dead": self.won_back_dead},
            "population": dict(zip(STATES, self.population)),
            "new_users_by_channel": dict(sorted(self.new_users_by_channel.items())),
            "growth": self.growth_result(),
            "first_purchases": self.first_purchases,
            "referred_revenue": None if self.referred_revenue is None else money(self.referred_revenue),
            "inviters": self.inviters,
            "retention": self.retention_result(),
            "activation": self.activation_result(),
            **({} if self.cohorts is None else {"cohorts": dict(sorted(self.cohorts.items()))}),
        }

    def activation_result(self) -> dict[str, Any]:
        """New users eligible for activation, those who purchased within the window, and their ratio; every value
        ``None`` if unknown in this period (docs/metrics.md)."""
        for _, (e, c) in sorted((self.activation or {}).items()):
            return {"eligible": e, "converted": c, "rate": ratio(c, e)}
        return dict.fromkeys(ACTIVATION_KEYS)

    def retention_result(self) -> dict[str, dict[str, Any]]:
        """``dN`` -> eligible, retained and their ratio, for every N known in this period (docs/metrics.md)."""
        return {f"d{n}": {"eligible": e, "retained": r, "rate": ratio(r, e)}
                for n, (e, r) in sorted((self.retention or {}).items())}

    def growth_result(self) -> dict[str, Any]:
        """Growth accounting (docs/metrics.md); every value ``None`` if the period's growth is unknown."""
        if not self.growth:
            return dict.fromkeys(GROWTH_KEYS)
        dormant = self.prev_active - self.retained
        return {"new": self.first_active, "retained": self.retained, "resurrected": self.resurrected,
                "dormant": dormant, "quick_ratio": quick_ratio(self.first_active + self.resurrected, dormant)}


GROWTH_KEYS = ("new", "retained", "resurrected", "dormant", "quick_ratio")
ACTIVATION_KEYS = ("eligible", "converted", "rate")


def ratio(num: int, den: int) -> str | None:
    """``num / den`` as a decimal string rounded half-even to 4 places; ``None`` if ``den`` is 0."""
    if not den:
        return None
    q = Decimal(num) / Decimal(den)
    return str(q.quantize(Decimal(1).scaleb(-RATIO_DECIMALS), rounding=ROUND_HALF_EVEN))


def quick_ratio(gained: int, dormant: int) -> str | None:
    """``gained / dormant`` as a decimal string rounded half-even to 4 places; ``None`` if nobody went dormant."""
    return ratio(gained, dormant)


def _sum_optional(a: int | None, b: int | None) -> int | None:
    """Sum of two counts either of which may be unknown (``None``: then the sum is too)."""
    return None if a is None or b is None else a + b


def _sum_known(a: dict[Any, int] | None, b: dict[Any, int] | None) -> dict[Any, int] | None:
    """Sum of two known-keys count maps: the keys both know (``None`` is neutral)."""
    if a is None:
        return None if b is None else dict(b)
    if b is None:
        return dict(a)
    return {k: v + b[k] for k, v in a.items() if k in b}


def _sum_retention(a: dict[int, list[int]] | None, b: dict[int, list[int]] | None) -> dict[int, list[int]] | None:
    """Sum of two retention maps (N -> [eligible, retained]): the Ns both know (``None`` is neutral)."""
    if a is None:
        return None if b is None else {n: list(v) for n, v in b.items()}
    if b is None:
        return {n: list(v) for n, v in a.items()}
    return {n: [v[0] + b[n][0], v[1] + b[n][1]] for n, v in a.items() if n in b}


def merge_all(items: list[PeriodMetrics]) -> PeriodMetrics:
    out = PeriodMetrics()
    for item in items:
        out = out.merge(item)
    return out
