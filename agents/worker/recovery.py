"""Recovery, in one place: rebuilding a partition's state from the state log.

The worker writes one :class:`~kpimon.agents.core.batch.Record` per processed
batch of input partition *p* to partition *p* of the state-log topic, before
any derived output (period partials, progress) leaves the worker.

Recovery replays the records of partition *p* in order (:class:`Replayer`).  A
record is applied only if its ``start`` equals the offset the replay has
reached, so a record written twice (a producer retry, or a worker fenced out
during a rebalance) is applied once.  The engine is deterministic, so replay
rebuilds exactly the state the previous owner had, and the consumer then seeks
the input partition to the record's ``end``: nothing is lost and nothing is
counted twice.

Three callers, one replay:

* :func:`replay_partitions`: the worker's engines of newly assigned partitions
  (``IngestService.recover``), with :class:`ServingRecovery` bringing the
  serving layer in Redis up to the same position;
* :func:`replay_users`: the serving layer's repair of a partition whose data
  Redis lost (``ServingWriter`` through its ``LogSource``);
* the tests' pipeline without Kafka (tests/pure_pipeline.py).

Why not Kafka transactions?  faust's ``exactly_once`` has known bugs
(faust-streaming #323, #517, #606) and the embedded Tansu broker does not
support transactions at all; one self-describing record per batch is atomic on
every Kafka-protocol broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from kpimon.agents.core.batch import Record, apply, decode
from kpimon.agents.core.dedup import DedupStore, NoDedup
from kpimon.agents.core.engine import Closed, EngineConfig, PartitionEngine
from kpimon.agents.serving.lua import FORCE, RESET
from kpimon.agents.serving.writer import ServingWriter
from kpimon.agents.worker.checkpoints import Commit, Found, load_newest
from kpimon.agents.worker.logread import read_to_end
from kpimon.errors import KpimonError

log = logging.getLogger("kpimon.recovery")

LogReader = Callable[..., AsyncIterator[tuple[int, int, Record]]]  # (partitions[, offsets by partition])


class StateLogError(KpimonError):
    """The state log cannot rebuild this partition's state; the message says why and what to do."""


class Replayer:
    """Applies a partition's records in order, skipping repeats; tracks the offset."""

    def __init__(self, engine: PartitionEngine, partition: int = 0) -> None:
        self.engine = engine
        self.partition = partition
        self.offset: int | None = None  # next source offset to read
        self.applied = 0
        self.skipped = 0

    def feed(self, record: Record) -> bool:
        expected = self.engine.cfg.fingerprint
        if record.config and expected and record.config != expected:
            raise StateLogError(
                f"state log partition {self.partition} was written under different settings (fingerprint "
                f"{record.config}, now {expected}): timezone, lateness, dedup_horizon, lifecycle thresholds, "
                "money.decimals, channels, retention.days and activation.window_days cannot change under existing "
                "state. Restore the previous settings, "
                "or start fresh under a new worker.app_id / kafka.topic_prefix and backfill.")
        if self.offset is not None and record.start != self.offset:
            self.skipped += 1
            return False
        apply(self.engine, record)
        self.offset = record.end
        self.applied += 1
        return True


@dataclass
class Recovered:
    """One partition rebuilt from its state log."""

    engine: PartitionEngine
    offset: int | None  # next source offset to read (None: from the beginning)
    log_end: int  # the state-log position reached (the offset after the partition's last record)
    applied: int
    skipped: int
    closed: list[Closed] = field(default_factory=list)  # every period the replayed records closed
    base: Commit | None = None  # the checkpoint the replay started from (None: the log's beginning)


StoreFactory = Callable[[int], DedupStore]


async def replay_partitions(cfg: EngineConfig, read: LogReader, partitions: list[int],
                            serving: ServingWriter | None = None,
                            stores: StoreFactory | None = None,
                            found: dict[int, Found] | None = None,
                            starts: dict[int, int] | None = None,
                            track_users: bool = False) -> dict[int, Recovered]:
    """Rebuild the engines of ``partitions`` from the state log (and the serving layer's users, if given).

    The periods closed by the replayed records are kept in ``closed``, every
    one of them: the previous owner may have stopped after its last poll's
    records were durable and before what they closed was published, and a poll
    can hold several records of a partition (input over ``RECORD_BYTES``, a
    watermark marker).  Re-publishing is idempotent downstream (the aggregator
    keeps the latest partial of a period and ignores periods already closed),
    and costs one message per period of the replayed stretch: with
    checkpoints, the tail after the newest one; without, about 430 per year
    of history.

    ``stores(p)`` opens partition ``p``'s dedup store (the worker's on disk,
    agents/worker/dedup_store.py; default: in memory).  A store on disk already
    holds the ids of the records before its ``position``: those records are
    replayed without adding their ids again.  A store that does not match the
    log (its position is beyond the log's end, or the record before its
    position is not the one it committed) is wiped and the partition replayed
    again.  At the end each store commits the state-log position reached.

    ``found`` holds each partition's checkpoints (agents/worker/checkpoints.py):
    the newest intact one is restored and only the state-log records from its
    position on are applied; the records before it only bring their ids to a
    dedup store that lacks them.  ``starts`` is each partition's state-log
    start offset: a log whose first records were deleted needs a checkpoint
    covering them, or recovery refuses (:class:`StateLogError`) -- it never
    starts from an empty state.
    """
    started = time.monotonic()
    opened = {p: stores(p) for p in partitions} if stores is not None else {}
    if opened:
        log.info("dedup stores of partitions %s opened in %.2fs", partitions, time.monotonic() - started)
    try:
        out = await _replay(cfg, read, partitions, serving, opened, found or {}, starts or {}, track_users)
    except BaseException:
        for store in opened.values():
            _close(store)
        raise
    return out


def _close(store: DedupStore) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


async def _replay(cfg: EngineConfig, read: LogReader, partitions: list[int], serving: ServingWriter | None,
                  opened: dict[int, DedupStore], found: dict[int, Found], starts: dict[int, int],
                  track_users: bool) -> dict[int, Recovered]:
    tracking = await ServingRecovery.begin(serving, partitions) if serving is not None else None
    done, stale = await _pass(cfg, read, partitions, tracking, opened, found, starts, track_users)
    if stale:
        for p in stale:
            log.warning("dedup store of partition %d does not match the state log: rebuilding it", p)
            opened[p].wipe()  # type: ignore[attr-defined]
        tracking = await ServingRecovery.begin(serving, stale) if serving is not None else None
        again, _ = await _pass(cfg, read, stale, tracking, opened, found, starts, track_users)
        done.update(again)
    out = {}
    for p in partitions:
        rp, closed, log_end, last_end, base = done[p]
        engine = rp.engine
        engine.outbox = []
        engine.transitions.clear()
        store = opened.get(p)
        if store is not None and hasattr(store, "commit"):
            store.replaying = False  # type: ignore[attr-defined]
            # Expired rows are deleted by the worker's next commits: not all partitions' share at once here
            # (up to EXPIRE_BUDGET ids each, ~0.15 s per store, before the first batch).
            store.commit(log_end, check=last_end, tidy=False)
        out[p] = Recovered(engine, rp.offset, log_end, rp.applied, rp.skipped, closed, base)
    return out


def _ids_only(engine: PartitionEngine, record: Record) -> None:
    """Bring a record's still-remembered event ids to the engine's dedup store, without applying the events."""
    store = engine.dedup_store
    keep = store.rule.first_kept(engine.wm)
    fresh = [ev for ev in record.events if store.rule.bucket(ev.ts) >= keep]
    if fresh:
        store.add([ev.event_id for ev in fresh], [ev.ts for ev in fresh])


COMMIT_EVERY = 200_000  # ids staged while replaying before they are committed (bounds recovery's memory)
# replayer, closed periods, log end, last record's end, the checkpoint it started from
Replayed = tuple[Replayer, list[Closed], int, int | None, Commit | None]


async def _pass(cfg: EngineConfig, read: LogReader, partitions: list[int], tracking: ServingRecovery | None,
                opened: dict[int, DedupStore], found: dict[int, Found], starts: dict[int, int],
                track_users: bool = False) -> tuple[dict[int, Replayed], list[int]]:
    """One replay of ``partitions``.  Also returns the partitions whose dedup store on disk does not match
    the log (stale: their replay is to be discarded and done again with the store wiped)."""
    replayers: dict[int, Replayer] = {}
    bases: dict[int, Commit] = {}
    started = time.monotonic()
    for p in partitions:
        start = starts.get(p, 0)
        loaded = None
        if p in found:
            loaded = load_newest(found[p], cfg, p, start, dedup=lambda p=p: opened.get(p))  # type: ignore[misc]
        if loaded is None:
            if start > 0:
                raise StateLogError(
                    f"state log partition {p} starts at offset {start} and no intact checkpoint covers the records "
                    "before it: the partition's state cannot be rebuilt. Restore the checkpoints topic, or start "
                    "fresh under a new worker.app_id / kafka.topic_prefix and backfill.")
            replayers[p] = Replayer(PartitionEngine(cfg, dedup=opened.get(p)), p)
            replayers[p].engine.track_users = track_users
            continue
        cp, engine, commit = loaded
        engine.track_users = track_users
        engine.dedup_store.expire(engine.wm)
        rp = replayers[p] = Replayer(engine, p)
        rp.offset = cp.source_offset
        bases[p] = commit
        if tracking is not None:
            tracking.restored(p, engine, commit.position)
        log.info("partition %d: checkpoint %s at state-log position %d restored (%d users)", p,
                 commit.digest[:12], commit.position, engine.user_count())
    restored = time.monotonic()
    closed: dict[int, list[Closed]] = {p: [] for p in partitions}
    log_end = {p: bases[p].position if p in bases else starts.get(p, 0) for p in partitions}
    last_end: dict[int, int | None] = dict.fromkeys(partitions)
    # Stores on disk: the state-log position they hold the ids up to, and the record end they committed with.
    disk: dict[int, tuple[int, int | None]] = {}
    for p in partitions:
        store = opened.get(p)
        if store is not None and hasattr(store, "commit"):
            store.replaying = False  # type: ignore[attr-defined]
            if store.position is not None:  # type: ignore[attr-defined]
                disk[p] = (store.position, store.check)  # type: ignore[attr-defined]
    stale: set[int] = set()
    # A checkpoint whose records' ids the store on disk already holds: the log before it is not even read
    # (from the record just before it, which both the store's and the checkpoint's checks look at).
    skip = {p: bases[p].position - 1 for p in bases
            if p in disk and disk[p][0] >= bases[p].position and bases[p].position > 0}
    for p, off in skip.items():
        log.info("partition %d: state log read from offset %d (the dedup store holds the ids before the "
                 "checkpoint)", p, off)
    n = 0
    async for p, offset, record in (read(partitions, skip) if skip else read(partitions)):
        n += 1
        if n % 8 == 0:
            await asyncio.sleep(0)  # a rebuild beside a running stream lets it go on
        rp = replayers[p]
        last_end[p] = record.end
        store = opened.get(p)
        at = disk.get(p)
        if at is not None:
            position, check = at
            store.replaying = offset < position  # type: ignore[union-attr]
            if offset == position - 1 and check is not None and record.end != check:
                stale.add(p)  # not the record the store committed with: another incarnation of the log
        base = bases.get(p)
        if base is None and rp.offset is None and rp.applied == 0 and offset > starts.get(p, 0):
            raise StateLogError(
                f"state log partition {p} starts at offset {offset}: records were deleted and no checkpoint "
                "covers them, so the partition's state cannot be rebuilt. Start fresh under a new worker.app_id "
                "/ kafka.topic_prefix and backfill.")
        if base is not None and offset < base.position:
            # Before the checkpoint: the engine has it all; a store that lacks these ids gets them.
            if store is not None and not getattr(store, "replaying", False):
                _ids_only(rp.engine, record)
            if offset == base.position - 1 and record.end != rp.offset:
                raise StateLogError(
                    f"checkpoint {base.digest[:12]} of partition {p} covers up to source offset {rp.offset}, but "
                    f"the state-log record before its position {base.position} ends at {record.end}: the "
                    "checkpoint does not belong to this state log")
            continue
        log_end[p] = offset + 1
        if tracking is not None:
            tracking.before(p, record, rp.engine, offset)
        if rp.feed(record):
            closed[p] += rp.engine.take_outbox()
        if at is not None or (store is not None and hasattr(store, "commit")):
            if not getattr(store, "replaying", True) and store.staged() >= COMMIT_EVERY:  # type: ignore[union-attr]
                store.commit(offset + 1, check=record.end)  # type: ignore[union-attr]
    log.info("partitions %s: checkpoints restored in %.2fs, %d state-log records read in %.2fs", partitions,
             restored - started, n, time.monotonic() - restored)
    for p, (position, _) in disk.items():
        if position > log_end[p]:
            stale.add(p)  # the log is shorter than what the store saw
    if tracking is not None:
        for p in partitions:
            if p not in stale:
                tracking.finish(p, replayers[p].engine, log_end[p])
    done = {p: (replayers[p], closed[p], log_end[p], last_end[p], bases.get(p)) for p in partitions}
    return done, sorted(stale)


async def replay_users(cfg: EngineConfig, read: LogReader, p: int, found: dict[int, Found] | None = None,
                       starts: dict[int, int] | None = None) -> tuple[dict[str, list], int]:
    """Every user of partition ``p`` as of the end of its state log, from a fresh replay (data-loss repair):
    the newest checkpoint if there is one, then the log after it.

    The replay remembers no event ids (:class:`NoDedup`): it only re-applies
    records, so its memory is that of the partition's users.  Returns the
    engine's records of every user (lifetime revenue included; the
    first signup's details for the signups replayed) and the state-log
    position reached.
    """
    rec = (await replay_partitions(cfg, read, [p], stores=lambda _: NoDedup(cfg.dedup_horizon), found=found,
                                   starts=starts, track_users=True))[p]
    rec.engine.touch_all()
    return rec.engine.take_touched(), rec.log_end


class ServingRecovery:
    """The serving side of :func:`replay_partitions` for the partitions being assigned.

    ``before`` switches change tracking on for the records past the stored
    position (all of them if it is unknown), ``finish`` submits the tracked users as one update
    from the stored position to the replay's end and leaves tracking on.
    Positions are state-log offsets: the record at offset ``o`` is reflected
    once the stored position is ``o + 1`` or more.
    """

    def __init__(self, writer: ServingWriter, partitions: list[int], known: dict[int, int | None] | None) -> None:
        self.writer = writer
        self.known = known
        if known is None:
            log.warning("serving layer unreachable while recovering partitions %s: every user of them will be "
                        "rewritten once it is back", partitions)

    @classmethod
    async def begin(cls, writer: ServingWriter, partitions: list[int]) -> ServingRecovery:
        writer.start()
        return cls(writer, partitions, await writer.read_offsets(partitions))

    def stored(self, p: int) -> int | None:
        return None if self.known is None else self.known.get(p)

    def restored(self, p: int, engine: PartitionEngine, position: int) -> None:
        """``engine`` was restored from a checkpoint at state-log ``position``: if the stored position is
        older (or unknown), the records in between are not replayed, so every user is rewritten."""
        stored = self.stored(p)
        if stored is None or stored < position:
            engine.touch_all()

    def before(self, p: int, record: Record, engine: PartitionEngine, offset: int) -> None:
        """``record`` (at state-log ``offset``) is about to be replayed."""
        stored = self.stored(p)
        engine.track_users = stored is None or offset >= stored

    def finish(self, p: int, engine: PartitionEngine, end: int) -> None:
        """The replay reached state-log position ``end`` (the offset after the partition's last record)."""
        stored = self.stored(p)
        if stored is None:
            start = RESET
        elif stored > end:
            log.error("serving layer position %d of partition %d is ahead of the state log (%d): it was written "
                      "by another deployment; overwriting (use a fresh redis.key_prefix per deployment)",
                      stored, p, end)
            start = FORCE
        else:
            start = stored
        engine.track_users = True
        self.writer.recovered(p, start, end, engine.take_touched())


async def read_log(bootstrap: str, topic: str, partitions: list[int], offsets: dict[int, int] | None = None
                   ) -> AsyncIterator[tuple[int, int, Record]]:
    """Yield (partition, state-log offset, Record) for every record of ``partitions`` of ``topic``, in order,
    from ``offsets[p]`` where given (else from where the log starts).

    A log whose first records were deleted is read from where it starts; whether
    a checkpoint covers what is missing is :func:`replay_partitions`' call.
    """
    async for p, msg in read_to_end(bootstrap, topic, partitions, offsets=offsets):
        yield p, msg.offset, decode(msg.value)
