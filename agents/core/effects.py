"""What each event type does to the numbers: the one table every counter reads.

The engine's period metrics, the ingest tally behind the Prometheus counters,
the ledger's restatement of late events, and the per-user lifetime revenue of
the serving layer all read :data:`EFFECTS`, so a purchase, a refund or an
invite means the same thing everywhere.  Pure.

Two kinds of effect:

* **flows** (``orders``, ``invites``, ``revenue``, ``refunds``, ``gross``) add
  up and commute: they depend only on the event, never on the user's state, so
  a late event's flows can be restated into a closed period;
* **state** effects (``signup``: the first signup makes a new user;
  ``purchase``: the first purchase in a period makes a paying user) depend on
  the user's history and are applied by the engine.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kpimon.streams.events import ACTIVITY, INVITE, PURCHASE, REFUND, SIGNUP


class Effect(NamedTuple):
    """One event type's effect.  Amount coefficients multiply the event's amount (minor units)."""

    orders: int = 0  # added to the order count
    invites: int = 0  # added to the invite count
    revenue: int = 0  # coefficient of the amount in net revenue
    refunds: int = 0  # coefficient of the amount in refunded money
    gross: int = 0  # coefficient of the amount in gross purchases (monotonic Prometheus counter)
    signup: bool = False  # the user's first signup makes a new user
    purchase: bool = False  # makes the user a paying user of the period
    flows: bool = False  # has any flow effect (one test instead of five)


def _effect(**kw: Any) -> Effect:
    flows = any(kw.get(name, 0) for name in ("orders", "invites", "revenue", "refunds", "gross"))
    return Effect(**kw, flows=flows)


# Indexed by the event code of kpimon.streams.events (ACTIVITY = 0, SIGNUP, PURCHASE, REFUND, INVITE).
EFFECTS: tuple[Effect, ...] = tuple(
    effect for _, effect in sorted({
        ACTIVITY: _effect(),
        SIGNUP: _effect(signup=True),
        PURCHASE: _effect(orders=1, revenue=1, gross=1, purchase=True),
        REFUND: _effect(revenue=-1, refunds=1),
        INVITE: _effect(invites=1),
    }.items())
)


def add_flows(target: Any, code: int, amount: int) -> bool:
    """Add the flows of one event to ``target`` (any object with ``orders``, ``invites``, ``revenue``, ``refunds``).

    Returns whether the event has flows.  ``gross`` is not added here: only the
    Prometheus tally keeps it (``Tally.gross``).
    """
    eff = EFFECTS[code]
    if not eff.flows:
        return False
    target.orders += eff.orders
    target.invites += eff.invites
    target.revenue += eff.revenue * amount
    target.refunds += eff.refunds * amount
    return True
