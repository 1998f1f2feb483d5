"""Checkpoints in Kafka: written in chunks, found again intact, and what they make redundant deleted.

A partition's checkpoint (agents/core/checkpoint.py) goes to partition *p* of
``<app_id>.checkpoints`` as chunks of at most :data:`CHUNK_BYTES` (any broker's
default message limit takes them), then one **commit** message that names the
checkpoint's digest, its chunk count and the state-log position it covers.  A
checkpoint counts only once its commit is acknowledged, and is loaded only if
every chunk is there and the SHA-256 over them matches: a worker killed while
writing one leaves chunks without a commit, which recovery ignores.

Recovery (:func:`read_commits`, then :func:`load_newest`) tries the newest
commit first and falls back to older ones, logging why each was refused.  The
worker deletes state-log and checkpoint records only up to the *previous*
intact checkpoint (:func:`deletable`), so there is always one to fall back to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from kpimon.agents.core import checkpoint as cp_codec
from kpimon.agents.core.checkpoint import Checkpoint, CheckpointError
from kpimon.agents.core.dedup import DedupRule, DedupStore
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.worker.logread import read_to_end

log = logging.getLogger("kpimon.checkpoints")

CHUNK_BYTES = 512 * 1024
H_DIGEST = "kpimon-checkpoint"  # header: the checkpoint's SHA-256 (hex)
H_PART = "kpimon-chunk"  # header: "<i>/<n>" on a chunk, "commit" on the commit message


class Commit(msgspec.Struct, array_like=True):
    """The commit message of one checkpoint (its value, msgpack)."""

    digest: str
    chunks: int
    size: int
    position: int  # state-log position covered
    first_offset: int  # offset of chunk 0 in the checkpoints partition
    max_ts: int = 0  # the engine's largest accepted ts when captured: the state log before ``position`` holds
    #                 no event with a later ts, which bounds what a new dedup store must re-read (:func:`log_floor`)
    history: list[tuple[int, int]] = []  # (position, max_ts) of earlier checkpoints, one per dedup bucket
    offset: int = -1  # the commit message's own offset (set when read back)


_commit_enc = msgspec.msgpack.Encoder()
_commit_dec = msgspec.msgpack.Decoder(Commit)


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]


async def write(producer, topic: str, partition: int, data: bytes, position: int, max_ts: int = 0,
                history: list[tuple[int, int]] | None = None) -> Commit:
    """Write one encoded checkpoint (chunks, then the commit) and wait for every acknowledgement."""
    digest = cp_codec.digest(data)
    parts = chunks_of(data)
    n = len(parts)
    sent = [await producer.send(topic, part, partition=partition,
                                headers=[(H_DIGEST, digest.encode()), (H_PART, f"{i}/{n}".encode())])
            for i, part in enumerate(parts)]
    metas = [await fut for fut in sent]
    commit = Commit(digest, n, len(data), position, metas[0].offset, max_ts, list(history or []))
    meta = await producer.send_and_wait(topic, _commit_enc.encode(commit), partition=partition,
                                        headers=[(H_DIGEST, digest.encode()), (H_PART, b"commit")])
    commit.offset = meta.offset
    return commit


@dataclass
class Found:
    """What one checkpoints partition holds: its commits (oldest first) and the chunks seen, by digest."""

    commits: list[Commit] = field(default_factory=list)
    chunks: dict[str, dict[int, bytes]] = field(default_factory=dict)

    def add(self, offset: int, headers, value: bytes | None) -> None:
        hdr = {k: v for k, v in headers or ()}
        digest, part = hdr.get(H_DIGEST), hdr.get(H_PART)
        if digest is None or part is None or value is None:
            return
        if part == b"commit":
            try:
                commit = _commit_dec.decode(value)
            except msgspec.DecodeError:
                log.warning("unreadable checkpoint commit at offset %d: ignored", offset)
                return
            commit.offset = offset
            self.commits.append(commit)
            return
        try:
            i = int(part.split(b"/")[0])
        except ValueError:
            return
        self.chunks.setdefault(digest.decode(), {})[i] = value

    def assemble(self, commit: Commit) -> bytes:
        """The bytes of ``commit``'s checkpoint; :class:`CheckpointError` if a chunk is missing."""
        got = self.chunks.get(commit.digest, {})
        missing = [i for i in range(commit.chunks) if i not in got]
        if missing:
            raise CheckpointError(f"checkpoint {commit.digest[:12]} misses {len(missing)} of {commit.chunks} chunks")
        data = b"".join(got[i] for i in range(commit.chunks))
        if len(data) != commit.size:
            raise CheckpointError(f"checkpoint {commit.digest[:12]} has {len(data)} bytes, its commit says "
                                  f"{commit.size}")
        if cp_codec.digest(data) != commit.digest:
            raise CheckpointError(f"checkpoint {commit.digest[:12]}: chunks do not match the commit's digest")
        return data


def load_newest(found: Found, cfg: EngineConfig, partition: int, log_start: int,
                dedup: Callable[[], DedupStore | None] = lambda: None
                ) -> tuple[Checkpoint, PartitionEngine, Commit] | None:
    """The newest intact checkpoint whose position the state log still reaches, restored; None if none.

    ``log_start`` is the state log's first offset: a checkpoint covering less
    than that would need records that are gone.  Every refusal is logged.
    """
    for commit in reversed(found.commits):
        if commit.position < log_start:
            log.warning("checkpoint %s of partition %d covers state-log position %d, but the log starts at %d: "
                        "skipped", commit.digest[:12], partition, commit.position, log_start)
            continue
        try:
            data = found.assemble(commit)
            cp, engine = cp_codec.load(cfg, data, partition, dedup())
        except CheckpointError as err:
            log.warning("checkpoint refused for partition %d: %s; trying an older one", partition, err)
            continue
        return cp, engine, commit
    return None


def history_after(commit: Commit, rule: DedupRule, wm: int) -> list[tuple[int, int]]:
    """The history the next checkpoint carries: this one's, plus this one, one entry per dedup bucket
    still remembered at ``wm`` (the latest checkpoint of each), and the latest of those already forgotten."""
    keep = rule.first_kept(wm)
    out: dict[int, tuple[int, int]] = {}
    for position, max_ts in [*commit.history, (commit.position, commit.max_ts)]:
        out[max(rule.bucket(max_ts), keep - 1)] = (position, max_ts)  # forgotten buckets share one entry
    return sorted(out.values())


def log_floor(commit: Commit, rule: DedupRule, wm: int) -> int:
    """The first state-log position a new dedup store still needs at watermark ``wm``: every record before
    it holds only ids the rule has forgotten (events with ts at most a checkpoint's max_ts)."""
    keep = rule.first_kept(wm)
    floor = 0
    for position, max_ts in [*commit.history, (commit.position, commit.max_ts)]:
        if rule.bucket(max_ts) < keep:
            floor = max(floor, position)
    return floor


def deletable(commits: list[Commit], rule: DedupRule, wm: int) -> tuple[int, int] | None:
    """(state-log offset, checkpoints offset) before which records may be deleted; None while there are
    fewer than two checkpoints.  The newest two stay loadable (the newest, and one to fall back to), and the
    state log keeps what a new machine's dedup store needs (:func:`log_floor`)."""
    if len(commits) < 2:
        return None
    previous = commits[-2]
    return min(previous.position, log_floor(commits[-1], rule, wm)), previous.first_offset


async def read(bootstrap: str, topic: str, partitions: list[int]) -> dict[int, Found]:
    """Every commit and chunk in ``partitions`` of the checkpoints topic (one reader for all of them)."""
    found = {p: Found() for p in partitions}
    async for p, msg in read_to_end(bootstrap, topic, partitions):
        found[p].add(msg.offset, msg.headers, msg.value)
    return found


async def delete_before(bootstrap: str, offsets: dict[tuple[str, int], int]) -> None:
    """Delete the records before ``offsets[(topic, partition)]`` (Kafka DeleteRecords)."""
    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
    from aiokafka.structs import TopicPartition

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(t, p): RecordsToDelete(off) for (t, p), off in offsets.items()
                                    if off > 0}, timeout_ms=30_000)
    finally:
        await admin.close()


class Checkpointer:
    """The worker's checkpoint schedule per partition, the writes, and the deletions they allow."""

    def __init__(self, settings, topics, rule: DedupRule) -> None:
        w = settings.worker
        self.enabled = bool(w.checkpoints)
        self.every_records = w.checkpoint_records
        self.every_s = w.checkpoint_interval / 1000
        self.bootstrap = settings.kafka.bootstrap
        self.topics = topics
        self.rule = rule
        self.commits: dict[int, list[Commit]] = {}  # per partition: the intact checkpoints kept, oldest first
        self._since: dict[int, tuple[int, float]] = {}  # per partition: records since the last one, and when
        self._deleted: dict[tuple[str, int], int] = {}
        self._delete_failed = False
        self._task: asyncio.Future | None = None  # the checkpoints being written, in the background

    def submit(self, producer, snaps: dict[int, tuple[bytes, int, int, int]], owned: Callable[[int], bool]) -> None:
        """Write checkpoints in the background, ``snaps[p] = (data, state-log position, max_ts, wm)``, so that
        polls go on meanwhile.  While earlier ones are still being written these are dropped, and their
        partitions are due again at their next record.  A failed write is raised by :meth:`check`."""
        self.check()
        if self._task is not None:
            for p in snaps:
                if p in self._since:
                    self._since[p] = (self.every_records, self._since[p][1])
            return
        self._task = asyncio.ensure_future(self._write_all(producer, snaps, owned))

    async def _write_all(self, producer, snaps: dict[int, tuple[bytes, int, int, int]],
                         owned: Callable[[int], bool]) -> None:
        for p, (data, position, max_ts, wm) in snaps.items():
            if owned(p):
                await self.write(producer, p, data, position, max_ts, wm)

    def check(self) -> None:
        """Re-raise the failure of the last background write, once it is done (then forget it)."""
        task = self._task
        if task is not None and task.done():
            self._task = None
            task.result()

    async def drain(self) -> None:
        """Wait for the checkpoints being written (before partitions are given up or the worker stops)."""
        task, self._task = self._task, None
        if task is not None:
            await task

    async def load(self, partitions: list[int]) -> tuple[dict[int, Found], dict[int, int]]:
        """Every checkpoint of ``partitions``, and where their state logs start now."""
        from kpimon.agents.worker.logread import log_starts

        if not self.enabled:
            return {}, {}  # nothing is deleted then; a log truncated anyway is refused on its first record
        found, starts = await asyncio.gather(read(self.bootstrap, self.topics.checkpoints, partitions),
                                             log_starts(self.bootstrap, self.topics.state_log, partitions))
        return found, starts

    def resume(self, p: int, base: Commit | None, found: Found | None) -> None:
        """Partition ``p`` was recovered from ``base`` (or from the log's beginning): keep it and the older
        ones as the checkpoints to fall back to; newer ones, refused, are not kept."""
        kept = [] if base is None or found is None else [c for c in found.commits if c.offset <= base.offset]
        self.commits[p] = kept[-2:]
        self._since[p] = (0, time.monotonic())

    def forget(self, p: int) -> None:
        self.commits.pop(p, None)
        self._since.pop(p, None)

    def due(self, p: int, records: int) -> bool:
        """Count ``records`` new state-log records of ``p``; whether a checkpoint is due now (then restart)."""
        if not self.enabled or p not in self._since:
            return False
        n, since = self._since[p]
        n += records
        now = time.monotonic()
        if n >= self.every_records or now - since >= self.every_s:
            self._since[p] = (0, now)
            return True
        self._since[p] = (n, since)
        return False

    async def write(self, producer, p: int, data: bytes, position: int, max_ts: int, wm: int) -> Commit:
        """Write a checkpoint of ``p`` covering state-log ``position``, then delete what it made redundant."""
        kept = self.commits.setdefault(p, [])
        history = history_after(kept[-1], self.rule, wm) if kept else []
        commit = await write(producer, self.topics.checkpoints, p, data, position, max_ts, history)
        kept.append(commit)
        del kept[:-2]
        log.info("checkpoint of partition %d at state-log position %d: %d bytes in %d chunks", p, position,
                 commit.size, commit.chunks)
        cut = deletable(kept, self.rule, wm)
        if cut is not None:
            wanted = {(self.topics.state_log, p): cut[0], (self.topics.checkpoints, p): cut[1]}
            todo = {tp: off for tp, off in wanted.items() if off > self._deleted.get(tp, 0)}
            if todo and not self._delete_failed:
                try:
                    await delete_before(self.bootstrap, todo)
                    self._deleted.update(todo)
                except Exception as err:  # noqa: BLE001 - a broker without DeleteRecords keeps everything: say so
                    self._delete_failed = True
                    log.warning("cannot delete state-log records before checkpoints (%s: %s): the state log and "
                                "the checkpoints topic keep growing; recovery still starts from the newest "
                                "checkpoint", type(err).__name__, err)
        return commit
