"""Which of the worker's loops are down, and why: ``/healthz`` and ``kpimon_loop_crashes_total``.

The loops are the ingest loop (agents/worker/ingest.py), the faust agents
``aggregate`` and ``restate``, and faust itself (a crash of the faust app
outside an agent).  A loop that fails is marked down with its reason and
counted; the worker then stops with exit code 1 (agents/worker/app.py), so
``/healthz`` answers 503 from the failure until the process is gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

LOOPS = ("ingest", "aggregate", "restate", "faust")
REASON_CHARS = 500  # a reason is the exception's type and message, cut to this length


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, bounded."""
    text = " ".join(str(exc).split())
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 1] + "…"


@dataclass
class Down:
    reason: str
    since: float  # epoch seconds


class Health:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.down: dict[str, Down] = {}
        self.crashes: dict[str, int] = dict.fromkeys(LOOPS, 0)
        self._counter = None
        if registry is not None:
            self._counter = Counter("kpimon_loop_crashes", "Failures of a worker loop (the worker then exits 1).",
                                    ["loop"], registry=registry)
            for loop in LOOPS:
                self._counter.labels(loop)  # exported at 0 from the start

    def crashed(self, loop: str, exc: BaseException) -> str:
        """Mark ``loop`` down because of ``exc``; count it; return the reason."""
        reason = describe(exc)
        self.crashes[loop] = self.crashes.get(loop, 0) + 1
        if self._counter is not None:
            self._counter.labels(loop).inc()
        self.down.setdefault(loop, Down(reason, time.time()))  # the first failure is the cause
        return reason

    @property
    def ok(self) -> bool:
        return not self.down

    def status(self, **extra: Any) -> tuple[int, dict[str, Any]]:
        """The HTTP status (200 or 503) and JSON body of ``/healthz``."""
        body: dict[str, Any] = {"status": "ok" if self.ok else "down", **extra}
        if not self.ok:
            body["down"] = {loop: {"reason": d.reason, "since": d.since} for loop, d in self.down.items()}
        body["crashes"] = dict(self.crashes)
        return (200 if self.ok else 503), body
