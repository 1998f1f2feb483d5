"""What the serving-layer tests share: a start instant, settings on a fresh Redis key prefix, zone look-up."""

from __future__ import annotations

import uuid

from kpimon.agents.core.engine import WINDOWS
from kpimon.agents.core.lifecycle import STATES, Ladder, Thresholds
from kpimon.config.settings import from_mapping

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def make_settings(url: str, **extra) -> object:
    data = {"redis": {"url": url, "key_prefix": f"t{uuid.uuid4().hex[:8]}:"},
            "kafka": {"topic_prefix": "serving-test."}}
    data.update(extra)
    return from_mapping(data, "<test>", env={})


def zone_of(settings, state: str) -> int:
    ladder = Ladder.build(Thresholds(*settings.lifecycle.thresholds), WINDOWS)
    return ladder.state.index(STATES.index(state))
