"""Lifecycle rules: states by inactivity, entries and win-backs.  Pure.

Let a user's activity instants be a1 < a2 < ... and the thresholds
T_silent < T_sleeping < T_churned < T_dead.  The user *enters* state S at
instant a_i + T_S if the next activity a_{i+1} is strictly later than that
instant (or never comes).  At an instant x the user is in the deepest state S
with x - a >= T_S; *just before* an instant ``end`` (population) the user is in
the deepest S with end - a > T_S.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

STATES = ("active", "silent", "sleeping", "churned", "dead")
ACTIVE, SILENT, SLEEPING, CHURNED, DEAD = range(5)
STATE_INDEX = {name: i for i, name in enumerate(STATES)}


class Thresholds(NamedTuple):
    silent: int
    sleeping: int
    churned: int
    dead: int

    def of(self, state: int) -> int:
        """Threshold (ms of inactivity) at which ``state`` (1..4) is entered."""
        return self[state - 1]


def state_at(gap_ms: int, th: Thresholds) -> int:
    """State at an instant that lies ``gap_ms`` after the last activity."""
    state = ACTIVE
    for s in (SILENT, SLEEPING, CHURNED, DEAD):
        if gap_ms >= th.of(s):
            state = s
    return state


def state_before(gap_ms: int, th: Thresholds) -> int:
    """State just before an instant ``gap_ms`` after the last activity (population)."""
    state = ACTIVE
    for s in (SILENT, SLEEPING, CHURNED, DEAD):
        if gap_ms > th.of(s):
            state = s
    return state


def entries_between(last: int, nxt: int | None, th: Thresholds) -> list[tuple[int, int]]:
    """(state, instant) entries after activity ``last`` and before activity ``nxt``."""
    out = []
    for s in (SILENT, SLEEPING, CHURNED, DEAD):
        instant = last + th.of(s)
        if nxt is None or nxt > instant:
            out.append((s, instant))
    return out


def won_back_depth(last: int, nxt: int, th: Thresholds) -> int | None:
    """CHURNED or DEAD if the activity ``nxt`` wins the user back, else None."""
    gap = nxt - last
    if gap > th.dead:
        return DEAD
    if gap > th.churned:
        return CHURNED
    return None


class Ladder(NamedTuple):
    """Zones of inactivity used by the engine to age users in O(1) per move.

    Zone k holds users whose inactivity is at least ``bounds[k]`` (zone 0: any).
    The bounds are the lifecycle thresholds plus the rolling windows (1d, 7d,
    30d for DAU/WAU/MAU), deduplicated and sorted.  ``state[k]`` is the
    lifecycle state of zone k; ``window_zones[w]`` is the number of leading
    zones whose users were active within window ``w``.
    """

    bounds: tuple[int, ...]
    state: tuple[int, ...]
    window_zones: tuple[int, ...]

    @classmethod
    def build(cls, th: Thresholds, windows: Iterable[int]) -> Ladder:
        windows = tuple(windows)
        bounds = tuple(sorted({0, *th, *windows}))
        states = tuple(state_at(b, th) for b in bounds)
        # A user active within window w has inactivity < w... at the watermark,
        # a user is in zone k iff last + bounds[k] < wm, so "within w" is
        # every zone whose bound is below w.
        window_zones = tuple(sum(1 for b in bounds if b < w) for w in windows)
        return cls(bounds, states, window_zones)
