"""The worker's dedup store on local disk: :class:`RocksDedup`, one RocksDB (rocksdict) per input partition.

It implements :class:`kpimon.agents.core.dedup.DedupStore` with the same rule
and the same answers as :class:`~kpimon.agents.core.dedup.MemoryDedup`, at
bounded memory: a 7-day horizon at 1,000 events/s is 600M ids, ~60 GB in
dicts, ~25 bytes per id on disk here (``python3 -m benchmarks.dedup_store``).

Layout (two column families of one RocksDB):

* ``default``: key = the 16-byte blake2b digest of the ``event_id``, value =
  its bucket (4 bytes big-endian, ``ts // BUCKET_MS``).  Plus one ``meta`` key
  (4 bytes, so it never collides with a digest): the committed state-log
  position, the store's identity, the oldest bucket kept and the per-bucket
  counts (for ``len``).
* ``journal``: key = bucket (4 bytes big-endian) + digest, empty value.  The
  ids of one bucket are one contiguous key range, so forgetting a bucket reads
  only that range (never a full scan) and removes it with one ``delete_range``.

Collisions: two distinct ids collide with probability at most N^2 / 2^129 for N
ids remembered at once (birthday bound on 128 bits): for N = 6e8 (7 days at
1,000 events/s) that is ~5e-22; a collision would make one event a duplicate.

Expiry is logical first: ``expire`` only raises the oldest bucket kept, and an
id whose bucket is older reads as forgotten at once.  The rows are deleted
later, in :meth:`RocksDedup.commit`, at most :data:`EXPIRE_BUDGET` journal
entries per commit (a bucket of 3.6M ids is spread over many commits instead
of stalling one batch).  A row is deleted only if its stored bucket still
equals the journal's (an id accepted again later, in a newer bucket, stays).

Writes are staged.  ``add`` keeps ids in memory, in *generations*
(:meth:`RocksDedup.seal` closes one per state-log record), and ``seen``
consults them first.  :meth:`RocksDedup.commit` writes the generations up to
one record, with the meta key, in one atomic ``WriteBatch``; the worker calls
it once that record is acknowledged by the state log.  So the store never
holds an id whose record could be lost: after a crash the events of
unacknowledged records are consumed again and must not look like duplicates.
The oldest bucket kept is staged the same way (a record's watermark is
persisted with that record only).

Memory: one block cache shared by every store of the process
(:data:`CACHE_BYTES`, index and filter blocks included), bloom filters, small
write buffers (:data:`WRITE_BUFFER_BYTES`, at most two per column family), and
the staged generations (the records in flight).  Nothing per id outlives a
commit.

Deleting a store's directory is safe: the worker finds it empty and re-adds
the ids from the state log on the next start (agents/worker/recovery.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any

from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    DBCompressionType,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from kpimon.agents.core.dedup import BUCKET_MS, DedupRule

log = logging.getLogger("kpimon.dedup")

CACHE_BYTES = 32 * 1024 * 1024  # the block cache of all stores of a process
WRITE_BUFFER_BYTES = 4 * 1024 * 1024  # per memtable; at most 2 per column family
EXPIRE_BUDGET = 50_000  # journal entries deleted per commit at most
META = b"meta"  # 4 bytes: never a 16-byte digest
JOURNAL = "journal"

_cache: Cache | None = None


def digest(event_id: str) -> bytes:
    return blake2b(event_id.encode(), digest_size=16).digest()


def _b4(bucket: int) -> bytes:
    return bucket.to_bytes(4, "big")


def _options() -> Options:
    global _cache
    if _cache is None:
        _cache = Cache(CACHE_BYTES)
    table = BlockBasedOptions()
    table.set_block_cache(_cache)
    table.set_bloom_filter(10, False)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.create_missing_column_families(True)
    opts.set_block_based_table_factory(table)
    opts.set_write_buffer_size(WRITE_BUFFER_BYTES)
    opts.set_max_write_buffer_number(2)
    opts.set_max_open_files(256)
    opts.set_max_background_jobs(1)
    opts.set_keep_log_file_num(2)
    opts.set_compression_type(DBCompressionType.none())  # digests do not compress
    # A bloom filter on the memtable too: most lookups are misses (new ids), 4 µs -> 0.7 µs each.
    opts.set_memtable_whole_key_filtering(True)
    opts.set_memtable_prefix_bloom_ratio(0.1)
    # No write-ahead log: a crash loses the latest commits as a whole (the column families flush together),
    # and recovery re-adds their ids from the state log past the position that survived.
    opts.set_atomic_flush(True)
    return opts


class _Gen:
    """The ids staged for one state-log record."""

    __slots__ = ("ids", "delta", "keep")

    def __init__(self, keep: int) -> None:
        self.ids: dict[bytes, int] = {}  # digest -> bucket
        self.delta: dict[int, int] = {}  # bucket -> change of its id count
        self.keep = keep  # the oldest bucket kept when the generation was sealed


class StoreLocked(OSError):
    """Another process holds the store's directory."""


class RocksDedup:
    """A :class:`~kpimon.agents.core.dedup.DedupStore` in a RocksDB; see the module docstring."""

    def __init__(self, path: str, identity: str, horizon: int) -> None:
        self.path = path
        self.identity = identity
        self.rule = DedupRule(horizon)
        self.replaying = False  # while True, add() is a no-op (recovery replays records already committed)
        self._db: Any = None  # Rdict
        self._open()

    # ----------------------------------------------------------------- open/close
    @classmethod
    def open(cls, path: str, identity: str, horizon: int, log_end: int | None = None) -> RocksDedup:
        """Open (or create) the store at ``path``; start empty if it belongs to something else.

        The store is wiped if its identity differs (another state log, partition
        or settings), or if ``log_end`` is given and the store's position is
        beyond it (the state log was recreated).
        """
        store = cls(path, identity, horizon)
        if store._meta_identity not in (None, identity):
            log.warning("dedup store %s belongs to %s, not %s: starting it empty", path, store._meta_identity, identity)
            store.wipe()
        elif log_end is not None:
            store.check_log_end(log_end)
        return store

    def check_log_end(self, log_end: int) -> bool:
        """Wipe the store if its position is beyond the state log's end; whether it was kept."""
        if self.position is not None and self.position > log_end:
            log.warning("dedup store %s is at state-log position %d, beyond the log's end %d: starting it empty",
                        self.path, self.position, log_end)
            self.wipe()
            return False
        return True

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        opts = _options()
        try:
            db = Rdict(self.path, opts, column_families={JOURNAL: _options()}, access_type=AccessType.read_write())
        except Exception as err:
            if "lock" in str(err).lower():
                raise StoreLocked(f"{self.path}: {err}") from err
            raise
        wo = WriteOptions()
        wo.disable_wal = True  # type: ignore[method-assign,assignment]  # a property; the stub says method
        db.set_write_options(wo)
        self._db = db
        self._journal: Any = db.get_column_family(JOURNAL)
        self._jh: Any = db.get_column_family_handle(JOURNAL)
        self._gens: list[_Gen] = []
        self._seq = 0  # generations sealed so far
        self._absent: dict[str, bytes] = {}  # ids the last seen() found absent, with their digests (for add)
        meta = db.get(META)
        m: dict[str, Any] = json.loads(meta) if meta is not None else {}
        self._meta_identity: str | None = m.get("identity")
        self.position: int | None = m.get("position")  # the state-log position committed (None: never)
        self.check: int | None = m.get("check")  # the source end of the record just before ``position``
        self.keep: int = m.get("keep", -(2**31))  # the oldest bucket remembered
        self._committed_keep = self.keep
        self._counts: dict[int, int] = {int(b): n for b, n in m.get("counts", {}).items()}
        self._cur = _Gen(self.keep)
        self._clean_below = -(2**31)  # no journal entry of a bucket older than this

    def close(self) -> None:
        """Flush what is committed and close; what is staged is dropped."""
        if self._db is not None:
            # Without a write-ahead log the memtables must reach disk: the journal first, so that a crash in
            # between leaves at worst journal entries without rows (harmless), never rows without entries.
            self._journal.flush()
            self._db.flush()
            self._journal = self._jh = None  # they hold the database open too
            self._db.close()
            self._db = None

    def wipe(self) -> None:
        """Forget everything: an empty store with this identity."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._open()
        self._meta_identity = self.identity

    @property
    def closed(self) -> bool:
        return self._db is None

    # ------------------------------------------------------------------ DedupStore
    def _staged(self, d: bytes) -> int | None:
        b = self._cur.ids.get(d)
        if b is not None:
            return b
        for g in reversed(self._gens):
            b = g.ids.get(d)
            if b is not None:
                return b
        return None

    def seen(self, ids: Sequence[str]) -> list[bool]:
        db = self._db
        assert db is not None, "dedup store is closed"
        keep = self.keep
        out = [False] * len(ids)
        ask: list[bytes] = []
        where: list[int] = []
        absent: dict[str, bytes] = {}
        staging = bool(self._cur.ids or self._gens)
        for k, i in enumerate(ids):
            d = blake2b(i.encode(), digest_size=16).digest()
            if staging:
                b = self._staged(d)
                if b is not None:
                    if b >= keep:
                        out[k] = True
                    else:
                        absent[i] = d
                    continue
            ask.append(d)
            where.append(k)
        if ask:
            for k, d, v in zip(where, ask, db[ask]):
                if v is not None and int.from_bytes(v, "big") >= keep:
                    out[k] = True
                else:
                    absent[ids[k]] = d
        self._absent = absent
        return out

    def add(self, ids: Sequence[str], ts: Sequence[int]) -> None:
        absent, self._absent = self._absent, {}
        if self.replaying:
            return
        db = self._db
        assert db is not None, "dedup store is closed"
        keep = self.keep
        gen = self._cur
        staged = gen.ids
        delta = gen.delta
        rows: list[tuple[bytes, int, bool]] = []
        ask: list[bytes] = []
        for i, t in zip(ids, ts):
            d = absent.pop(i, None)
            known = d is not None  # absent at the last seen(): new, unless staged since
            if d is None:
                d = blake2b(i.encode(), digest_size=16).digest()
                if self._staged(d) is None:
                    ask.append(d)
            rows.append((d, t // BUCKET_MS, known))
        on_disk = {d: int.from_bytes(v, "big") for d, v in zip(ask, db[ask]) if v is not None} if ask else {}
        for d, b, known in rows:
            old = self._staged(d)
            if old is None and not known:
                old = on_disk.get(d)
            if old is not None and old >= keep:
                delta[old] = delta.get(old, 0) - 1
            staged[d] = b
            delta[b] = delta.get(b, 0) + 1

    def expire(self, wm: int) -> None:
        keep = self.rule.first_kept(wm)
        if keep > self.keep:
            self.keep = keep

    def __len__(self) -> int:
        keep = self.keep
        counts: dict[int, int] = {}
        for g in (*self._gens, self._cur):
            for b, n in g.delta.items():
                counts[b] = counts.get(b, 0) + n
        for b, n in self._counts.items():
            counts[b] = counts.get(b, 0) + n
        return sum(n for b, n in counts.items() if b >= keep)

    # ------------------------------------------------------------------ staging
    def seal(self) -> int:
        """Close the current generation (the ids of one state-log record); its number, for :meth:`commit`."""
        gen = self._cur
        gen.keep = self.keep
        self._gens.append(gen)
        self._seq += 1
        self._cur = _Gen(self.keep)
        return self._seq

    def staged(self) -> int:
        """How many ids are staged (not committed)."""
        return len(self._cur.ids) + sum(len(g.ids) for g in self._gens)

    def commit(self, position: int, upto: int | None = None, check: int | None = None) -> None:
        """Write the generations sealed up to ``upto`` (all, sealing the current one, if None) and the meta
        key -- ``position`` (the state-log position those records reach) and ``check`` (the source end of
        the record just before it) -- in one atomic write; then forget them from memory."""
        db = self._db
        assert db is not None, "dedup store is closed"
        if upto is None:
            upto = self.seal()
        first = self._seq - len(self._gens) + 1  # number of self._gens[0]
        n = max(0, min(upto - first + 1, len(self._gens)))
        done, self._gens = self._gens[:n], self._gens[n:]
        keep = done[-1].keep if done else self._committed_keep
        puts: dict[bytes, int] = {}
        counts = self._counts
        for g in done:
            puts.update(g.ids)
            for b, c in g.delta.items():
                counts[b] = counts.get(b, 0) + c
        wb = WriteBatch(raw_mode=True)
        jh = self._jh
        self._expire_rows(wb, keep, puts)
        for d, b in puts.items():
            bb = _b4(b)
            wb.put(d, bb)
            wb.put(bb + d, b"", jh)
        self._counts = counts = {b: c for b, c in counts.items() if b >= keep and c}
        self.position, self.check, self._committed_keep = position, check, keep
        meta = {"identity": self.identity, "position": position, "check": check, "keep": keep,
                "counts": {str(b): c for b, c in counts.items()}}
        wb.put(META, json.dumps(meta).encode())
        db.write(wb)
        self._meta_identity = self.identity

    def _expire_rows(self, wb: WriteBatch, keep: int, puts: dict[bytes, int]) -> int:
        """Stage the deletion of up to EXPIRE_BUDGET journal entries of buckets older than ``keep``."""
        db = self._db
        assert db is not None
        if keep <= self._clean_below:
            return 0  # no journal entry older than ``keep`` is left
        end = _b4(max(keep, 0))
        it = self._journal_iter()
        it.seek_to_first()
        keys: list[bytes] = []
        while it.valid() and len(keys) < EXPIRE_BUDGET:
            k = it.key()
            if k >= end:
                break
            keys.append(k)
            it.next()
        del it
        if len(keys) < EXPIRE_BUDGET:
            self._clean_below = keep  # once this batch is written
        if not keys:
            return 0
        digests = [k[4:] for k in keys]
        for k, d, v in zip(keys, digests, db[digests]):
            if v is not None and v == k[:4] and d not in puts:
                wb.delete(d)
        wb.delete_range(keys[0], keys[-1] + b"\x00", self._jh)
        return len(keys)

    def _journal_iter(self) -> Any:
        return self._journal.iter(ReadOptions())

    def disk_bytes(self) -> int:
        """Bytes of the store's files (tools and benchmarks)."""
        total = 0
        for root, _, files in os.walk(self.path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return total


_private_names = itertools.count()


def open_partition_store(state_dir: str, name: str, partition: int, identity: str, horizon: int) -> RocksDedup:
    """The store of one input partition, ``<state_dir>/<name>/dedup-<partition>``.

    If another process holds it (two workers of one deployment on one machine,
    the previous owner not gone yet), a private store next to it is used
    instead, started empty (``dedup-<partition>.<pid>-<n>``; recovery fills it
    from the state log) and removed when closed.
    """
    path = os.path.join(state_dir, name, f"dedup-{partition}")
    try:
        return RocksDedup.open(path, identity, horizon)
    except StoreLocked:
        private = f"{path}.{os.getpid()}-{next(_private_names)}"  # unique within the process too
        log.warning("dedup store %s is in use by another process: using %s, rebuilt from the state log",
                    path, private)
        shutil.rmtree(private, ignore_errors=True)
        store = RocksDedup.open(private, identity, horizon)
        store.remove_on_close = True  # type: ignore[attr-defined]
        return store


def close_store(store: Any) -> None:
    """Close a partition's store (no-op for stores without ``close``); remove a private one."""
    close = getattr(store, "close", None)
    if close is None:
        return
    close()
    if getattr(store, "remove_on_close", False):
        shutil.rmtree(store.path, ignore_errors=True)
