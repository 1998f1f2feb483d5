"""The engine's fast path for plain activities (``PLAIN`` in agents/core/engine.py) against the general rules.

The fast path skips ``_instant`` for a user of zone 0 already active today whose waiting instants are plain
activities close to the last one.  With it switched off every instant goes through the general rules; the
state, the users touched for the serving layer and every closed period must be the same either way.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpimon.agents.core import engine as engine_mod
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.streams.events import Decoder
from tests.factories import settings_factory, streams_of_events, to_lines
from tests.pure_pipeline import closed_state, engine_state

DAY = 86_400_000


def _run(lines: list[bytes], lateness: str, batch: int, plain: frozenset[int]) -> tuple:
    s = settings_factory(lateness=lateness)
    dec = Decoder(s.money.decimals, min_epoch_ms=s.min_epoch_ms)
    engine = PartitionEngine(EngineConfig.from_settings(s))
    engine.track_users = True
    saved = engine_mod.PLAIN
    engine_mod.PLAIN = plain
    touched, closed = [], []
    try:
        events = [dec.decode(line) for line in lines]
        for i in range(0, len(events), batch):
            engine.offer_batch(events[i:i + batch])
            engine.advance()
            touched.append(sorted(engine.take_touched().items()))
            closed += engine.take_outbox()
        mid = engine_state(engine)
        engine.advance(marker=max((ev.ts for ev in events), default=0) + 40 * DAY)  # past the dead threshold
        touched.append(sorted(engine.take_touched().items()))
        closed += engine.take_outbox()
    finally:
        engine_mod.PLAIN = saved
    return mid, engine_state(engine), touched, closed_state(closed), engine.take_transitions()


@pytest.mark.parametrize("lateness", ["1h", "3d"])  # steps shorter and longer than silent_after (2d)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=streams_of_events(max_users=4), batch=st.integers(1, 6))
def test_the_fast_path_gives_what_the_general_rules_give(lateness: str, events, batch: int) -> None:
    lines = to_lines(events)
    assert engine_mod.PLAIN  # activity, refund and invite: the fast path is on by default
    assert _run(lines, lateness, batch, engine_mod.PLAIN) == _run(lines, lateness, batch, frozenset())


def test_the_fast_path_is_taken() -> None:
    """A user active every 10 minutes of one day: after the first instant, every step takes the fast path."""
    calls = []
    s = settings_factory(lateness="0s")
    engine = PartitionEngine(EngineConfig.from_settings(s))
    original = engine._apply_user
    engine._apply_user = lambda uid, items: (calls.append(len(items)), original(uid, items))  # type: ignore
    dec = Decoder(s.money.decimals)
    t0 = 1_704_067_200_000
    for i in range(30):
        engine.offer_batch([dec.decode(b'{"event_id":"e%d","user_id":"u","type":"login","ts":%d}'
                                       % (i, t0 + i * 600_000))])
        engine.advance(marker=t0 + i * 600_000 + 1)
    assert calls == [1]  # the first instant (a new user) only
    assert engine.users_state()["u"][1] == t0 + 29 * 600_000
