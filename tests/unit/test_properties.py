"""Properties of the streaming pipeline on generated streams (hypothesis).

(a) pipeline == the batch reference of the spec;
(b) disorder within lateness does not change the report;
(c) the partition count does not change the report;
(d) at-least-once redelivery does not change the report, duplicates are counted;
(e) the batch size does not change the report;
(f) state-log replay rebuilds the same engine (and is idempotent per record).
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kpimon.agents.core.engine import ACCEPTED
from kpimon.streams.events import Decoder
from tests.factories import DAY, LATENESS, settings_factory, streams_of_events, to_lines, ts_ms_of
from tests.pure_pipeline import (
    closed_state,
    engine_state,
    partitioner,
    process_all,
    replay_records,
    run_pipeline,
)
from tests.reference import accepted_events, reference_report

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
TIMEZONES = st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata"])
# How far past the last event the final watermark marker goes.
UNTIL_EXTRA = st.sampled_from([0, 1, LATENESS, DAY, 20 * DAY])

GARBAGE = [
    b"not json",
    b"[1, 2]",
    b'{"event_id":"g-noamount","user_id":"u0","type":"purchase","ts":1704067200000}',
    b'{"event_id":"g-nouser","type":"login","ts":1704067200000}',
    b'{"event_id":"g-3dp","user_id":"u1","type":"refund","ts":1704067200000,"amount":"1.005"}',
]


def until_of(events: list[dict[str, Any]], extra: int) -> int:
    return max(ts_ms_of(ev) for ev in events) + extra


def jittered(events: list[dict[str, Any]], rnd: random.Random) -> list[dict[str, Any]]:
    """Reordered so that no event arrives after one more than ``lateness`` ms later than it.

    Sorting on ``ts + jitter`` with ``0 <= jitter < lateness``: if f arrives
    before e then ``f.ts - e.ts <= jitter_e - jitter_f < lateness``.
    """
    keyed = [(ts_ms_of(ev) + rnd.randrange(LATENESS), i, ev) for i, ev in enumerate(events)]
    return [ev for _, _, ev in sorted(keyed, key=lambda k: (k[0], k[1]))]


def max_disorder(events: list[dict[str, Any]]) -> int:
    worst, seen = 0, None
    for ev in events:
        ts = ts_ms_of(ev)
        if seen is not None:
            worst = max(worst, seen - ts)
        seen = ts if seen is None else max(seen, ts)
    return worst


# --------------------------------------------------------------------------- #
# (a)


# Regression: a user active on Tue 2024-01-30 and Fri 2024-02-02 (one ISO week
# straddling two months) was not counted in February's distinct users before
# commit 11c2343 (see test_engine_boundaries: month-distinct-users-week-straddles-month).
@example(events=[{"event_id": "a", "user_id": "u0", "type": "login", "ts": 1706608800000},  # 2024-01-30
                 {"event_id": "b", "user_id": "u0", "type": "login", "ts": 1706868000000}],  # 2024-02-02
         tz="UTC", partitions=1, batch_size=7, extra=30 * DAY, garbage=[])
@PROPS
@given(events=streams_of_events(), tz=TIMEZONES, partitions=st.sampled_from([1, 2, 4]),
       batch_size=st.sampled_from([1, 3, 7, 50]), extra=UNTIL_EXTRA,
       garbage=st.lists(st.sampled_from(GARBAGE), max_size=3))
def test_pipeline_matches_reference(events, tz, partitions, batch_size, extra, garbage) -> None:
    s = settings_factory(timezone=tz)
    until = until_of(events, extra)
    lines = to_lines(events)
    for i, junk in enumerate(garbage):
        lines.insert((i * 7) % (len(lines) + 1), junk)
    got = run_pipeline(lines, s, partitions, until, batch_size=batch_size)
    want = reference_report(events, s, until, partition_of=partitioner(partitions))
    assert sorted(got) == sorted(want)
    diff = {k: {f: (want[k][f], got[k][f]) for f in want[k] if want[k][f] != got[k][f]}
            for k in want if want[k] != got[k]}
    assert not diff, f"(reference, pipeline) per period: {diff}"
    accepted = accepted_events(events, s, partitioner(partitions))
    assert got.totals["accepted"] == len(accepted)
    assert got.totals["rejected"] == len(garbage)
    assert got.totals["duplicates"] + got.totals["late"] == len(events) - len(accepted)
    assert got.watermark == until


# --------------------------------------------------------------------------- #
# (b)


@PROPS
@given(events=streams_of_events(), tz=TIMEZONES, seed=st.integers(0, 2**32 - 1), extra=UNTIL_EXTRA)
def test_disorder_within_lateness_changes_nothing(events, tz, seed, extra) -> None:
    s = settings_factory(timezone=tz)
    until = until_of(events, extra)
    shuffled = jittered(events, random.Random(seed))
    assert max_disorder(shuffled) < LATENESS
    base = run_pipeline(to_lines(events), s, 1, until)
    other = run_pipeline(to_lines(shuffled), s, 1, until)
    assert dict(other) == dict(base)
    assert other.totals == base.totals
    assert other.totals["late"] == 0


# --------------------------------------------------------------------------- #
# (c)


@PROPS
@given(events=streams_of_events(), tz=TIMEZONES, extra=UNTIL_EXTRA, batch_size=st.sampled_from([1, 7]))
def test_partition_count_changes_nothing(events, tz, extra, batch_size) -> None:
    s = settings_factory(timezone=tz)
    until = until_of(events, extra)
    one = run_pipeline(to_lines(events), s, 1, until, batch_size=batch_size)
    four = run_pipeline(to_lines(events), s, 4, until, batch_size=batch_size)
    assert dict(four) == dict(one)
    assert four.totals == one.totals
    assert four.watermark == one.watermark == until


# --------------------------------------------------------------------------- #
# (d)


@PROPS
@given(events=streams_of_events(), tz=TIMEZONES, extra=UNTIL_EXTRA, partitions=st.sampled_from([1, 3]),
       garbage=st.lists(st.sampled_from(GARBAGE), max_size=2))
def test_redelivery_changes_nothing(events, tz, extra, partitions, garbage) -> None:
    s = settings_factory(timezone=tz)
    until = until_of(events, extra)
    lines = to_lines(events) + garbage
    base = run_pipeline(lines, s, partitions, until)
    # Through the dedup by event_id: every copy is refused again.
    again = run_pipeline(lines, s, partitions, until, redeliver=True)
    assert dict(again) == dict(base)
    t0, t1 = base.totals, again.totals
    assert t1["accepted"] == t0["accepted"]
    assert t1["duplicates"] == 2 * t0["duplicates"] + t0["accepted"]
    assert t1["late"] == 2 * t0["late"]
    assert t1["rejected"] == 2 * t0["rejected"]
    # Through the worker's offset filter: the copies never reach the engine.
    skipped = run_pipeline(lines, s, partitions, until, redeliver="offsets")
    assert dict(skipped) == dict(base)
    assert skipped.totals == base.totals


# --------------------------------------------------------------------------- #
# (e)


@PROPS
@given(events=streams_of_events(), tz=TIMEZONES, extra=UNTIL_EXTRA, partitions=st.sampled_from([1, 2]))
def test_batch_size_changes_nothing(events, tz, extra, partitions) -> None:
    s = settings_factory(timezone=tz)
    until = until_of(events, extra)
    runs = [run_pipeline(to_lines(events), s, partitions, until, batch_size=n) for n in (1, 7, 1000)]
    assert dict(runs[1]) == dict(runs[0]) and dict(runs[2]) == dict(runs[0])
    assert runs[1].totals == runs[0].totals == runs[2].totals
    for p in range(partitions):
        states = [engine_state(r.engines[p]) for r in runs]
        assert states[1] == states[0] and states[2] == states[0]


# --------------------------------------------------------------------------- #
# (f)


@PROPS
@given(events=streams_of_events(), tz=TIMEZONES, extra=UNTIL_EXTRA, batch_size=st.sampled_from([1, 3, 7]),
       later_shift=st.sampled_from([DAY, 10 * DAY, 40 * DAY]))
def test_statelog_replay_rebuilds_the_engine(events, tz, extra, batch_size, later_shift) -> None:
    s = settings_factory(timezone=tz)
    until = until_of(events, extra)
    run = run_pipeline(to_lines(events), s, 2, until, batch_size=batch_size)
    decoder = Decoder(s.money.decimals)
    for p in range(2):
        live, records = run.engines[p], run.records[p]
        engine, replayer, outbox = replay_records(records, s)
        assert replayer.applied == len(records) and replayer.skipped == 0
        assert replayer.offset == run.inputs[p][-1].offset + 1
        assert engine_state(engine) == engine_state(live)
        assert closed_state(outbox) == closed_state(run.partials[p])

        # A record written twice is applied once.
        twice, rep2, outbox2 = replay_records(records, s, repeat_each=True)
        assert rep2.skipped == len(records)
        assert engine_state(twice) == engine_state(live)
        assert closed_state(outbox2) == closed_state(run.partials[p])

        # Later inputs give the same outputs on the live and the rebuilt engine.
        later = [decoder.decode(line) for line in to_lines(events)]
        for eng in (live, engine):
            for ev in later:
                shifted = type(ev)(ev.ts + later_shift + until - min(e.ts for e in later), ev.event_id + "-later",
                                   ev.user_id, ev.code, ev.type, ev.amount, ev.channel, ev.referrer_id)
                eng.offer(shifted)
            eng.advance(marker=until + later_shift + 60 * DAY)
        assert closed_state(engine.take_outbox()) == closed_state(live.take_outbox())
        assert engine_state(engine) == engine_state(live)


@PROPS
@given(events=streams_of_events(), tz=TIMEZONES, extra=UNTIL_EXTRA, batch_size=st.sampled_from([1, 3, 7]),
       crash_at=st.floats(0, 1))
def test_recovery_mid_stream_gives_the_same_result(events, tz, extra, batch_size, crash_at) -> None:
    """Crash after k records: replay them, resume at the last record's end, finish the input."""
    s = settings_factory(timezone=tz)
    until = until_of(events, extra)
    run = run_pipeline(to_lines(events), s, 1, until, batch_size=batch_size)
    records = run.records[0]
    k = int(crash_at * len(records))
    engine, replayer, outbox = replay_records(records[:k], s)
    start = replayer.offset if replayer.offset is not None else 0
    rest, more = process_all(engine, s, run.inputs[0], start, batch_size)
    assert engine_state(engine) == engine_state(run.engines[0])
    assert closed_state(outbox + more) == closed_state(run.partials[0])
    # The resumed log chains on and replays to the same engine again.
    again, rep, _ = replay_records(records[:k] + rest, s)
    assert rep.skipped == 0
    assert engine_state(again) == engine_state(run.engines[0])


def test_offer_after_replay_refuses_duplicates() -> None:
    """The dedup index is rebuilt by replay: an event seen before the crash is a duplicate after it."""
    s = settings_factory()
    line = b'{"event_id":"x1","user_id":"u1","type":"login","ts":1704067200000}'
    run = run_pipeline([line], s, 1, 1704067200000 + DAY)
    engine, _, _ = replay_records(run.records[0], s)
    ev = Decoder().decode(line)
    assert engine.offer(ev) != ACCEPTED
    assert engine.totals.duplicates == 1
