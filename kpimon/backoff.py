"""Exponential back-off delays, the one helper of every "retry until it works" loop.

Pure (no third-party imports).  The loops that use it (the serving writer's
flush and rebuild, the snapshot store) retry forever while a service is down
and keep their own stop conditions, so a retry library's stop/wait policies
add nothing there; this is the arithmetic they shared, written once.
"""

from __future__ import annotations


class Backoff:
    """Delays ``first, first*factor, ...`` capped at ``cap``; :meth:`reset` after a success.

    >>> b = Backoff(0.5, cap=2.0)
    >>> [b.next() for _ in range(4)]
    [0.5, 1.0, 2.0, 2.0]
    """

    __slots__ = ("first", "cap", "factor", "_next")

    def __init__(self, first: float, cap: float, factor: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.factor = factor
        self._next = first

    def next(self) -> float:
        """The delay to wait now; the following one grows by ``factor`` up to ``cap``."""
        delay = self._next
        self._next = min(delay * self.factor, self.cap)
        return delay

    def reset(self) -> None:
        """Start again from ``first`` (the operation succeeded)."""
        self._next = self.first
