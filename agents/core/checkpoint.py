"""Checkpoints of one partition's engine: the whole state as bytes, verified before it is trusted.  Pure.

A checkpoint lets recovery start from a recent state and replay only the
state-log tail after it, instead of the whole history (Kafka Streams'
changelog-plus-local-store and Flink's checkpoints are the models).  It holds:

* ``source_offset``: the input offset the records it covers reached (the
  ``end`` of the last one): recovery chains the state-log tail on from there;
  the state-log position it covers is only known once that record is
  acknowledged, so the commit that makes the checkpoint count carries it
  (agents/worker/checkpoints.py);
* ``fingerprint``: the settings the state was computed under
  (``EngineConfig.fingerprint``); a checkpoint under other settings is refused;
* the engine state: watermark, cursor, open periods and their numbers, every
  user's packed state in zone order, lifetime revenue per paying user, the
  instants waiting for the watermark (per user), the flows that arrived for
  days not open yet, the totals.

The dedup store is not in it: it lives on local disk and records its own
position (agents/core/dedup.py, agents/worker/dedup_store.py).

:func:`encode` appends a SHA-256 of the body; :func:`decode` refuses bytes
whose hash, format version or structure do not check out
(:class:`CheckpointError`), so a torn or corrupted checkpoint is never loaded.
"""

from __future__ import annotations

import hashlib
import sys
from array import array

import msgspec

from kpimon.agents.core.dedup import DedupStore
from kpimon.agents.core.engine import (
    HIGH_SHIFT,
    LOW,
    NEVER,
    PURCHASE_SHIFT,
    TS_SHIFT,
    Closed,
    EngineConfig,
    PartitionEngine,
    Totals,
)
from kpimon.agents.core.grains import GRAINS
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.errors import KpimonError
from kpimon.streams.events import SIGNUP

FORMAT = 3
# Format 1: pending events with their amounts (their flows not applied yet), no ``ahead``.  Formats 1 and 2:
# no signup days in the users' states (bits 43-59 zero), so no ``cohorts_since`` either, and the high part of a
# state is the purchase minute alone (no referred bit, no invite day; engine.PURCHASE_SHIFT was 43, then 60).
READS = (1, 2, 3)
_DIGEST = 32  # SHA-256
_V1_CODE_SHIFT = 50  # format 1 pending: ts, and (code << 50) | amount


class CheckpointError(KpimonError):
    """Bytes that are not a complete, intact checkpoint of this format."""


class EngineState(msgspec.Struct, array_like=True, gc=False):
    max_ts: int
    wm: int
    cursor: int | None
    period_starts: list[int]  # the open period of each grain (by its start instant), [] before any event
    accs: list[dict]  # their numbers (PeriodMetrics.to_wire)
    # Per zone, in zone order: user ids, and their packed states split at HIGH_SHIFT (a packed state can
    # exceed 64 bits, msgpack's limit): the low bits (last activity, signed up, signup day) and the high ones
    # (referred, purchase minute, invite day).
    zones: list[tuple[list[str], list[int], list[int]]]
    lifetime: tuple[list[str], list[int]]  # lifetime net revenue of every user who ever paid or was refunded
    # Format 1 only: accepted, not applied yet, per user, as two lists: ts, and (code << 50) | amount.
    pending: list[tuple[str, list[int], list[int]]]
    pending_signups: list[tuple[str, list[tuple[int, str, str | None, str | None]]]]
    totals: tuple[int, int, int, dict[str, int]]  # accepted, duplicates, late, rejected by reason
    outbox: list[tuple[int, int, dict]]  # closed and not taken yet: (grain index, period start, numbers)
    # Format 2: each user's pending ints, (ts << TS_SHIFT) | code, as little-endian int64 bytes.
    pending_packed: list[tuple[str, bytes]] = []
    ahead: list[tuple[int, dict]] = []  # flows of days not open yet: (day start, numbers)
    # Format 3: the instant from which first signups' days are recorded (PartitionEngine.cohorts_since).
    cohorts_since: int | None = None
    # Format 3: the revenue of pending instants (PartitionEngine.pending_revenue): user, instants, amounts.
    pending_revenue: list[tuple[str, list[int], list[int]]] = []


class Checkpoint(msgspec.Struct, array_like=True, gc=False):
    format: int
    partition: int
    source_offset: int | None  # the input offset the applied records reached (the last one's end)
    fingerprint: str
    engine: EngineState


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Checkpoint)


def capture(engine: PartitionEngine) -> EngineState:
    """The engine's durable state (not the exporter's transitions, nor the serving layer's tracking)."""
    t = engine.totals
    return EngineState(
        max_ts=engine.max_ts,
        wm=engine.wm,
        cursor=engine.cursor,
        period_starts=[p.start_ms for p in engine._periods],
        accs=[acc.to_wire() for acc in engine._accs],
        zones=[(list(z), [v & LOW for v in z.values()], [v >> HIGH_SHIFT for v in z.values()])
               for z in engine.zones],
        lifetime=(list(engine.lifetime), list(engine.lifetime.values())),
        pending=[],
        pending_signups=[(uid, list(sig)) for uid, sig in engine.pending_signups.items()],
        totals=(t.accepted, t.duplicates, t.late, dict(t.rejected)),
        outbox=[(GRAINS.index(c.period.grain), c.period.start_ms, c.metrics.to_wire()) for c in engine.outbox],
        pending_packed=[(uid, _packed(cur)) for uid, cur in engine.pending.items()],
        ahead=[(start, m.to_wire()) for start, m in sorted(engine.ahead.items())],
        cohorts_since=engine.cohorts_since,
        pending_revenue=[(uid, list(stash), list(stash.values())) for uid, stash in engine.pending_revenue.items()],
    )


def _packed(cur: int | array) -> bytes:
    arr = array("q", (cur,)) if isinstance(cur, int) else cur
    if _SWAP:
        arr = array("q", arr)
        arr.byteswap()
    return arr.tobytes()


def _unpacked(data: bytes) -> int | array:
    arr = array("q")
    arr.frombytes(data)
    if _SWAP:
        arr.byteswap()
    return arr[0] if len(arr) == 1 else arr


_SWAP = sys.byteorder == "big"  # the bytes are little-endian on every machine


def restore(cfg: EngineConfig, state: EngineState, dedup: DedupStore | None = None) -> PartitionEngine:
    """A new engine in exactly the captured state (``dedup`` brings its own remembered ids)."""
    engine = PartitionEngine(cfg, dedup)
    if len(state.zones) != len(engine.zones):
        raise CheckpointError(f"checkpoint has {len(state.zones)} lifecycle zones, the settings give "
                              f"{len(engine.zones)}")
    engine.max_ts, engine.wm, engine.cursor = state.max_ts, state.wm, state.cursor
    cal = cfg.calendar
    engine._periods = [cal.period_at(start, grain) for start, grain in zip(state.period_starts, GRAINS)]
    engine.derive_prev_starts()
    # Signup days are recorded from the checkpoint's cursor on if it was written before they were (its users'
    # days are unknown: the cohorts and N-day retentions whose signups began earlier are unknown).
    if state.cohorts_since is not None:
        engine.cohorts_since = state.cohorts_since
    elif state.cursor is not None:
        engine.cohorts_since = state.cursor
    else:
        engine.cohorts_since = NEVER
    # The open periods' numbers; written before growth accounting, their growth is unknown (PeriodMetrics.growth).
    engine._accs = [PeriodMetrics.from_wire(m) for m in state.accs]
    shift = HIGH_SHIFT if state.cohorts_since is not None else PURCHASE_SHIFT  # format 3, or 1 and 2
    engine.zones = [dict(zip(uids, [lo | (hi << shift) for lo, hi in zip(low, high, strict=True)],
                             strict=True)) for uids, low, high in state.zones]
    engine.pending_revenue = {uid: dict(zip(items, amounts, strict=True))
                              for uid, items, amounts in state.pending_revenue}
    engine.lifetime = dict(zip(*state.lifetime, strict=True))
    engine.ahead = {start: _flows_only(m) for start, m in state.ahead}
    for uid, data in state.pending_packed:
        cur = _unpacked(data)
        if not isinstance(cur, int) and not cur:
            raise CheckpointError(f"checkpoint has no pending instants for user {uid!r}")
        engine.pending[uid] = cur
        engine._mark_due(uid, (cur if isinstance(cur, int) else cur[0]) >> TS_SHIFT)
    for uid, ts, rest in state.pending:  # format 1: the flows of these events are applied now, as on arrival
        items: list[int] = []
        for t, r in zip(ts, rest, strict=True):
            code, amount = r >> _V1_CODE_SHIFT, r & ((1 << _V1_CODE_SHIFT) - 1)
            engine._add_flows(uid, t, code, amount)
            item = (t << TS_SHIFT) | code
            if not items or item != items[-1] or code == SIGNUP:  # an instant kept once, as _hold does
                items.append(item)
        engine.pending[uid] = items[0] if len(items) == 1 else array("q", items)
        engine._mark_due(uid, ts[0])
    engine.pending_signups = {uid: list(sig) for uid, sig in state.pending_signups}
    accepted, duplicates, late, rejected = state.totals
    engine.totals = Totals(accepted, duplicates, late, dict(rejected))
    engine.outbox = [Closed(cal.period_at(start, GRAINS[g]), PeriodMetrics.from_wire(m))
                     for g, start, m in state.outbox]
    return engine


def _flows_only(wire: dict) -> PeriodMetrics:
    """An ``ahead`` accumulator: flows of a day not open yet, so its growth counts and first purchases are complete
    (zero: they are counted when the day is open)."""
    acc = PeriodMetrics.from_wire(wire)
    acc.growth = True
    acc.first_purchases = acc.inviters = 0
    return acc


def encode(cp: Checkpoint) -> bytes:
    """The checkpoint's bytes: msgpack body, then its SHA-256."""
    body = _encoder.encode(cp)
    return body + hashlib.sha256(body).digest()


def digest(data: bytes) -> str:
    """The hex SHA-256 that :func:`encode` appended (the checkpoint's identity in logs)."""
    return data[-_DIGEST:].hex()


def decode(data: bytes) -> Checkpoint:
    """A verified checkpoint, or :class:`CheckpointError` saying what is wrong."""
    if len(data) <= _DIGEST:
        raise CheckpointError(f"checkpoint of {len(data)} bytes is truncated")
    body, want = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != want:
        raise CheckpointError("checkpoint hash mismatch: torn or corrupted")
    try:
        cp = _decoder.decode(body)
    except msgspec.DecodeError as err:
        raise CheckpointError(f"checkpoint does not decode: {err}") from None
    if cp.format not in READS:
        raise CheckpointError(f"checkpoint format {cp.format}, this version reads {', '.join(map(str, READS))}")
    return cp


def take(engine: PartitionEngine, partition: int, source_offset: int | None) -> bytes:
    """Capture and encode ``engine`` as the state after the record that ended at ``source_offset``."""
    return encode(Checkpoint(FORMAT, partition, source_offset, engine.cfg.fingerprint, capture(engine)))


def load(cfg: EngineConfig, data: bytes, partition: int, dedup: DedupStore | None = None
         ) -> tuple[Checkpoint, PartitionEngine]:
    """Verify ``data`` and rebuild its engine; refuses another partition's or other settings' checkpoint."""
    cp = decode(data)
    if cp.partition != partition:
        raise CheckpointError(f"checkpoint of partition {cp.partition}, expected {partition}")
    if cfg.fingerprint and cp.fingerprint != cfg.fingerprint:
        raise CheckpointError(f"checkpoint written under other settings (fingerprint {cp.fingerprint}, "
                              f"now {cfg.fingerprint})")
    return cp, restore(cfg, cp.engine, dedup)
