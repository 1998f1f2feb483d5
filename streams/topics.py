"""Topic names, partition counts, headers and the small wire formats between stages.

No faust import: tools (backfill, send, tests) use these names too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

# Header on a control record in ``kpimon.events``: its value (ASCII epoch ms)
# moves the watermark of the partition it is in.  Backfill writes one into every
# partition after the input so that closing does not wait for the wall clock.
WATERMARK_HEADER = "kpimon-watermark"

# Headers on dead-letter and late records (the value is the original bytes).
H_REASON = "kpimon-reason"
H_DETAIL = "kpimon-detail"
H_TOPIC = "kpimon-source-topic"
H_PARTITION = "kpimon-source-partition"
H_OFFSET = "kpimon-source-offset"
H_WATERMARK = "kpimon-watermark"


@dataclass(frozen=True)
class Topics:
    """All topic names for one deployment (``prefix`` isolates runs and tests)."""

    prefix: str = ""
    app_id: str = "kpimon"

    @property
    def events(self) -> str:
        return f"{self.prefix}kpimon.events"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}kpimon.events.dlq"

    @property
    def late(self) -> str:
        return f"{self.prefix}kpimon.events.late"

    @property
    def state_log(self) -> str:
        """Internal: one record per processed batch; same partition count as events."""
        return f"{self.prefix}{self.app_id}.state-log"

    @property
    def checkpoints(self) -> str:
        """Internal: checkpoints of the partition engines; same partition count as events."""
        return f"{self.prefix}{self.app_id}.checkpoints"

    @property
    def partials(self) -> str:
        """Internal, 1 partition: per-partition closed-period numbers and progress."""
        return f"{self.prefix}{self.app_id}.period-partials"

    @property
    def periods(self) -> str:
        """Closed periods aggregated over all partitions (and watermark notices)."""
        return f"{self.prefix}kpimon.periods"

    @property
    def snapshots(self) -> str:
        """Period-close snapshots, every version (docs/kpis.md)."""
        return f"{self.prefix}kpimon.snapshots"

    def single_partition(self) -> tuple[str, ...]:
        return (self.dlq, self.late, self.partials, self.periods, self.snapshots)


# ---- wire messages on the partials and periods topics (JSON) ----------------
class Partial(msgspec.Struct, tag="partial", tag_field="kind"):
    partition: int
    partitions: int
    grain: str
    period: str
    start: int
    end: int
    metrics: dict[str, Any]


class OpenPeriod(msgspec.Struct, array_like=True):
    grain: str
    period: str
    start: int
    end: int
    metrics: dict[str, Any]


class Progress(msgspec.Struct, tag="progress", tag_field="kind"):
    partition: int
    partitions: int
    watermark: int
    totals: dict[str, Any]
    open: list[OpenPeriod] | None = None  # the open period of each grain, so far (live KPIs), now and then


class ClosedPeriod(msgspec.Struct, tag="closed", tag_field="kind"):
    grain: str
    period: str
    start: int
    end: int
    partitions: int
    metrics: dict[str, Any]


class GlobalWatermark(msgspec.Struct, tag="watermark", tag_field="kind"):
    watermark: int
    partitions: int
    totals: dict[str, Any]


PartialsMessage = Partial | Progress
PeriodsMessage = ClosedPeriod | GlobalWatermark

json_encode = msgspec.json.Encoder().encode
decode_partials = msgspec.json.Decoder(PartialsMessage).decode
decode_periods = msgspec.json.Decoder(PeriodsMessage).decode
