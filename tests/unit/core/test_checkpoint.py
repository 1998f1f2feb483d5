"""Checkpoints: an engine captured at any record boundary and restored behaves exactly like the original."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kpimon.agents.core import checkpoint
from kpimon.agents.core.checkpoint import CheckpointError
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.core.grains import GRAINS
from kpimon.agents.core.metrics import GROWTH, LATER, PeriodMetrics
from kpimon.agents.worker.recovery import Replayer
from kpimon.streams.events import Decoder
from tests.factories import DAY, settings_factory, streams_of_events, to_lines, ts_ms_of
from tests.pure_pipeline import closed_state, engine_state, replay_records, run_pipeline
from tests.unit.core.v1_scenario import T0, scenario_events

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])


def _later(events, until: int, shift: int):
    """The same stream again, ``shift`` after ``until``, with new ids: inputs after the checkpoint."""
    decoded = [Decoder().decode(line) for line in to_lines(events)]
    first = min(ev.ts for ev in decoded)
    return [type(ev)(ev.ts + shift + until - first, ev.event_id + "-later", ev.user_id, ev.code, ev.type,
                     ev.amount, ev.channel, ev.referrer_id) for ev in decoded]


@PROPS
@given(events=streams_of_events(), tz=st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata"]),
       cut=st.floats(0, 1), batch_size=st.sampled_from([1, 3, 7]), shift=st.sampled_from([0, DAY, 10 * DAY]))
def test_restored_engine_continues_like_the_original(events, tz, cut, batch_size, shift) -> None:
    s = settings_factory(timezone=tz)
    until = max(ts_ms_of(ev) for ev in events) + DAY
    records = run_pipeline(to_lines(events), s, 1, until, batch_size=batch_size).records[0]
    k = int(cut * len(records))
    original, _, _ = replay_records(records[:k], s)
    data = checkpoint.take(original, 0, records[k - 1].end if k else None)
    cp, restored = checkpoint.load(original.cfg, data, 0, dedup=original.dedup_store)
    assert (cp.source_offset, cp.partition) == (records[k - 1].end if k else None, 0)
    assert engine_state(restored) == engine_state(original)
    # Twins from here: the rest of the log, then new inputs, give the same state and outputs.
    twin, _, _ = replay_records(records[:k], s)
    rp_twin, rp_restored = Replayer(twin), Replayer(restored)
    rp_twin.offset = rp_restored.offset = records[k - 1].end if k else None
    outs: dict[str, list] = {"twin": [], "restored": []}
    for rec in records[k:]:
        for name, rp in (("twin", rp_twin), ("restored", rp_restored)):
            assert rp.feed(rec)
            outs[name] += rp.engine.take_outbox()
    for name, eng in (("twin", twin), ("restored", restored)):
        for ev in _later(events, until, shift):
            eng.offer(ev)
        eng.advance(marker=until + shift + 60 * DAY)
        outs[name] += eng.take_outbox()
    assert closed_state(outs["restored"]) == closed_state(outs["twin"])
    assert engine_state(restored) == engine_state(twin)


def _some_checkpoint() -> tuple[EngineConfig, bytes]:
    s = settings_factory()
    lines = [b'{"event_id":"a","user_id":"u1","type":"signup","ts":1704067200000,"channel":"organic"}',
             b'{"event_id":"b","user_id":"u1","type":"purchase","ts":1704070800000,"amount":"9.99"}']
    run = run_pipeline(lines, s, 1, 1704067200000 + 3 * DAY)
    engine, _, _ = replay_records(run.records[0], s)
    return engine.cfg, checkpoint.take(engine, 0, run.records[0][-1].end)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:-1], "hash mismatch"),
    (lambda b: b[: len(b) // 2], "hash mismatch"),
    (lambda b: b[:10], "truncated"),
    (lambda b: b"", "truncated"),
    (lambda b: bytes([b[0] ^ 1]) + b[1:], "hash mismatch"),
    (lambda b: b[:-40] + bytes([b[-40] ^ 0xFF]) + b[-39:], "hash mismatch"),
])
def test_a_torn_or_corrupted_checkpoint_is_refused(damage, message) -> None:
    cfg, data = _some_checkpoint()
    checkpoint.load(cfg, data, 0)  # intact: loads
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(cfg, damage(data), 0)


def test_a_checkpoint_of_another_partition_or_other_settings_is_refused() -> None:
    cfg, data = _some_checkpoint()
    with pytest.raises(CheckpointError, match="partition 0, expected 1"):
        checkpoint.load(cfg, data, 1)
    other = EngineConfig.from_settings(settings_factory(timezone="Asia/Kolkata"))
    with pytest.raises(CheckpointError, match="other settings"):
        checkpoint.load(other, data, 0)


def test_a_fresh_engine_round_trips() -> None:
    engine = PartitionEngine(EngineConfig.from_settings(settings_factory()))
    _, restored = checkpoint.load(engine.cfg, checkpoint.take(engine, 3, None), 3)
    assert engine_state(restored) == engine_state(engine)


def test_buffered_events_users_and_open_periods_survive() -> None:
    """Mid-stream: events waiting for the watermark, users in several zones, open periods with numbers."""
    s = settings_factory()
    dec = Decoder(s.money.decimals)
    engine = PartitionEngine(EngineConfig.from_settings(s))
    t0 = 1704067200000
    for i in range(40):  # users active 0..39 days ago, one purchase each
        engine.offer(dec.decode(b'{"event_id":"p%d","user_id":"u%d","type":"purchase","ts":%d,"amount":"1.50"}'
                                % (i, i, t0 + i * DAY)))
    engine.advance(marker=t0 + 40 * DAY)
    late_ts = t0 + 40 * DAY + 1000
    engine.offer(dec.decode(b'{"event_id":"w","user_id":"u0","type":"login","ts":%d}' % late_ts))
    assert engine.pending_count() == 1 and len({z for z, *_ in engine.users_state().values()}) > 2
    _, restored = checkpoint.load(engine.cfg, checkpoint.take(engine, 0, 41), 0, dedup=engine.dedup_store)
    assert engine_state(restored) == engine_state(engine)
    assert restored.pending_state() == [("u0", [(late_ts, 0)])]
    for eng in (engine, restored):
        eng.advance(marker=late_ts + 2 * DAY)
    assert closed_state(restored.take_outbox()) == closed_state(engine.take_outbox())


def test_a_format_1_checkpoint_from_the_previous_release_still_loads() -> None:
    """data/checkpoint-v1.bin was written by the release before flows were applied on arrival (format 1: the
    pending events carried their amounts).  Loaded now, it is the state of today's engine after the same events,
    and it closes the same periods."""
    # That release's settings: the test defaults of then, without retention and activation (their defaults add
    # nothing to the fingerprint, so its checkpoints are still this deployment's).
    s = settings_factory(lateness="2d", retention={"days": [1, 7, 30]}, activation={"window_days": 7})
    dec = Decoder(s.money.decimals)
    engine = PartitionEngine(EngineConfig.from_settings(s))
    engine.offer_batch([dec.decode(raw) for raw in scenario_events()])
    data = (Path(__file__).parent / "data" / "checkpoint-v1.bin").read_bytes()
    cp, restored = checkpoint.load(engine.cfg, data, 0, dedup=engine.dedup_store)
    assert cp.format == 1 and cp.source_offset == 99 and cp.engine.pending and not cp.engine.pending_packed
    assert engine.pending_count() > 20 and engine.ahead  # purchases wait, and flows arrived for days not open yet
    # That release had no growth accounting: the periods open in it have unknown growth, never zeros.
    assert [acc.growth for acc in restored._accs] == [False] * len(GRAINS)
    assert all(acc.growth for acc in restored.ahead.values())  # days not open yet: only flows, complete
    assert _growth_free(engine_state(restored)) == _growth_free(engine_state(engine))
    # Nor signup days: cohorts and N-day retentions are known for signups after its cursor only.
    since = restored.cohorts_since
    assert since == cp.engine.cursor and all(acc.retention == {} for acc in restored._accs)
    open_then = {(str(p.grain), p.label) for p in restored._periods}
    for eng in (engine, restored):
        eng.advance(marker=T0 + 12 * DAY)
    closed = closed_state(engine.take_outbox())
    got = closed_state(restored.take_outbox())
    assert len(closed) > 10 and [c[:2] for c in got] == [c[:2] for c in closed]
    cal = engine.cal
    known_retention = 0
    for (grain, label, want), (_, _, have) in zip(closed, got, strict=True):
        h, w = PeriodMetrics.from_wire(have), PeriodMetrics.from_wire(want)
        if (grain, label) in open_then:
            assert not h.growth and _without_new(have) == _without_new(want)
            assert h.first_purchases is h.inviters is h.referred_revenue is None
        else:  # opened after the load: complete, growth, first purchases and inviters included
            assert _without_new(have) == _without_new(want) and h.growth
            assert (h.first_purchases, h.inviters) == (w.first_purchases, w.inviters)
            # Referred revenue counts the users whose first signup this version applied (docs/metrics.md).
            assert h.referred_revenue is not None
        first = cal.day_ordinal(cal.parse(grain, label).start_ms)
        for name in ("retention", "activation"):
            assert getattr(h, name) == {n: v for n, v in getattr(w, name).items()
                                        if cal.periods_of_day(first - n)[0].start_ms >= since}
        known_retention += len(h.retention)
        if w.cohorts is None:
            assert h.cohorts is None
        else:
            assert h.cohorts == {c: v for c, v in w.cohorts.items() if cal.parse(grain, c).start_ms >= since}
    assert known_retention  # the days from the second after the load on know their 1-day retention
    # Written again, it is format 3 and round-trips.
    again = checkpoint.take(restored, 0, 99)
    assert checkpoint.decode(again).format == checkpoint.FORMAT == 3
    assert engine_state(checkpoint.load(engine.cfg, again, 0, dedup=engine.dedup_store)[1]) == engine_state(restored)


def _without_new(wire: dict) -> dict:
    """A period's numbers without those a format-1 checkpoint cannot have: growth, retention and cohorts."""
    return {k: v for k, v in wire.items() if k not in (*GROWTH, *LATER, "retention", "activation", "cohorts")}


def _growth_free(state: dict) -> dict:
    """An engine_state() without the growth, retention and cohort counts of its open periods."""
    return {**state, "open": [(g, label, _without_new(m)) for g, label, m in state["open"]]}
