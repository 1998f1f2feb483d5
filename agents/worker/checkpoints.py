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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from kpimon.agents.core import checkpoint as cp_codec
from kpimon.agents.core.checkpoint import Checkpoint, CheckpointError
from kpimon.agents.core.dedup import DedupStore
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
    offset: int = -1  # the commit message's own offset (set when read back)


_commit_enc = msgspec.msgpack.Encoder()
_commit_dec = msgspec.msgpack.Decoder(Commit)


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]


async def write(producer, topic: str, partition: int, data: bytes, position: int) -> Commit:
    """Write one encoded checkpoint (chunks, then the commit) and wait for every acknowledgement."""
    digest = cp_codec.digest(data)
    parts = chunks_of(data)
    n = len(parts)
    sent = [await producer.send(topic, part, partition=partition,
                                headers=[(H_DIGEST, digest.encode()), (H_PART, f"{i}/{n}".encode())])
            for i, part in enumerate(parts)]
    metas = [await fut for fut in sent]
    commit = Commit(digest, n, len(data), position, metas[0].offset)
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
        if cp.position != commit.position:
            log.warning("checkpoint %s of partition %d: position %d differs from its commit's %d; trying an older "
                        "one", commit.digest[:12], partition, cp.position, commit.position)
            continue
        return cp, engine, commit
    return None


def deletable(commits: list[Commit]) -> tuple[int, int] | None:
    """(state-log offset, checkpoints offset) before which records may be deleted, keeping the newest
    two checkpoints (the newest, and one to fall back to); None while there are fewer than two."""
    if len(commits) < 2:
        return None
    previous = commits[-2]
    return previous.position, previous.first_offset


async def read(bootstrap: str, topic: str, partition: int) -> Found:
    """Every commit and chunk in partition ``partition`` of the checkpoints topic."""
    found = Found()
    async for _, msg in read_to_end(bootstrap, topic, [partition]):
        found.add(msg.offset, msg.headers, msg.value)
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
