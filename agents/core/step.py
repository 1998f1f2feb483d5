"""The partition step's outputs and the close step, as pure functions that return what must be written.

The worker (agents/worker/ingest.py, agents/worker/app.py) and the tests'
pipeline without Kafka (tests/pure_pipeline.py) both call these, so the tests
exercise the real steps rather than a copy of them.

* :func:`partition_outputs`: after a partition's batch, the messages for the
  partials topic: every period the engine closed (``Partial``), then its
  ``Progress`` (watermark, totals, optionally its open periods).
* :func:`close_step`: one message of the partials topic into the
  :class:`~kpimon.agents.core.aggregate.Aggregator`; returns what must be
  published on ``kpimon.periods`` (in order), and what to hand to
  ``Aggregator.mark_published`` once it has been published.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kpimon.agents.core.aggregate import Aggregator
from kpimon.agents.core.engine import Closed, PartitionEngine
from kpimon.streams.topics import ClosedPeriod, GlobalWatermark, OpenPeriod, Partial, Progress


@dataclass
class PartitionOutputs:
    """What one partition's step produced: the closed periods, then its progress."""

    closed: list[Closed]
    messages: list[Partial | Progress]


def partition_outputs(engine: PartitionEngine, partition: int, partitions: int,
                      with_open: bool = False) -> PartitionOutputs:
    """Take the engine's closed periods and build the partials-topic messages (no I/O)."""
    closed = engine.take_outbox()
    messages: list[Partial | Progress] = []
    for item in closed:
        period = item.period
        messages.append(Partial(partition, partitions, str(period.grain), period.label, period.start_ms,
                                period.end_ms, item.metrics.to_wire()))
    tot = engine.totals
    live = None
    if with_open:
        live = [OpenPeriod(str(per.grain), per.label, per.start_ms, per.end_ms, m.to_wire())
                for per, m in engine.open_metrics()]
    messages.append(Progress(partition, partitions, engine.wm, {
        "accepted": tot.accepted, "rejected": dict(tot.rejected), "duplicates": tot.duplicates, "late": tot.late},
        live))
    return PartitionOutputs(closed, messages)


def message_key(msg: Partial | Progress) -> bytes:
    """The partials topic's key of a message (the aggregation keeps the latest per key)."""
    if isinstance(msg, Partial):
        return f"{msg.grain}/{msg.period}".encode()
    return f"progress/{msg.partition}".encode()


@dataclass
class CloseStep:
    """What one partials message makes the aggregation write: ``publish`` on ``kpimon.periods``
    (closed periods, each then snapshotted, and the watermark notice), then ``mark`` as published."""

    publish: list[ClosedPeriod | GlobalWatermark] = field(default_factory=list)
    mark: list[ClosedPeriod | GlobalWatermark] = field(default_factory=list)


def close_step(aggregator: Aggregator, msg: Partial | Progress) -> CloseStep:
    """Feed one partials message to the aggregation (no I/O)."""
    if isinstance(msg, Partial):
        aggregator.on_partial(msg)
        return CloseStep()
    ready = aggregator.on_progress(msg)
    return CloseStep([out for out in ready if aggregator.reportable(out)], ready)
