"""The worker's dedup store on local disk: :class:`RocksDedup`, one RocksDB (rocksdict) per input partition.

It implements :class:`kpimon.agents.core.dedup.DedupStore` with the same rule
and the same answers as :class:`~kpimon.agents.core.dedup.MemoryDedup`, at
bounded memory: a 7-day horizon at 1,000 events/s is 600M ids, ~60 GB in
dicts, ~45 bytes per id on disk here (``python3 -m benchmarks.dedup_store``).

Layout (two column families of one RocksDB):

* ``default``: key = the 16-byte BLAKE2b digest (128 bits) of the ``event_id`` (UTF-8),
  value = its bucket (4 bytes big-endian, ``ts // BUCKET_MS``).  Plus one
  ``meta`` key (4 bytes, so it never collides with a digest): the committed
  state-log position, the store's identity and layout (:data:`FORMAT`), the
  oldest bucket kept, the per-bucket counts (for ``len``) and the journal's
  sequence number.
* ``journal``: key = bucket (4 bytes big-endian) + a sequence number (8 bytes
  big-endian), value = the digests of ids of that bucket, concatenated (at most
  :data:`JOURNAL_CHUNK` per entry, written by one commit).  The ids of one
  bucket are one contiguous key range, so forgetting a bucket reads only that
  range (never a full scan) and removes it with one ``delete_range``; and a
  commit writes one journal entry per bucket, not one per id.

Collisions: keys are 128-bit BLAKE2b digests, so two distinct ids collide with
probability at most N^2 / 2^129 for N ids remembered at once (birthday bound on
128 bits): for N = 6e8 (7 days at 1,000 events/s) that is ~5e-22; a collision
would make one event a duplicate.  BLAKE2b is a cryptographic hash, so the
bound also holds for ids a hostile producer crafts to collide with another
user's events (a non-cryptographic 128-bit hash such as XXH3 is ~0.5 µs per id
cheaper, but its collisions can be constructed).

Expiry is logical first: ``expire`` only raises the oldest bucket kept, and an
id whose bucket is older reads as forgotten at once.  The rows are deleted
later, in :meth:`RocksDedup.commit`, about :data:`EXPIRE_BUDGET` ids per
commit (whole journal entries: at most one entry more; a bucket of 3.6M ids is
spread over many commits instead of stalling one batch).  A row is deleted
only if its stored bucket still equals the journal's (an id accepted again later, in a newer bucket, stays).

Writes are staged.  ``add`` keeps ids in memory, in *generations*
(:meth:`RocksDedup.seal` closes one per state-log record), and ``seen``
consults them first.  :meth:`RocksDedup.commit` writes the generations up to
one record, with the meta key, in one atomic ``WriteBatch``; the worker calls
it once that record is acknowledged by the state log.  So the store never
holds an id whose record could be lost: after a crash the events of
unacknowledged records are consumed again and must not look like duplicates.
The oldest bucket kept is staged the same way (a record's watermark is
persisted with that record only).  A commit goes to RocksDB's write-ahead
log, not synced: it survives the worker being killed (the log is in the
OS's page cache), so a restarted worker's store is at the position it
committed last, and recovery reads no state-log records before the newest
checkpoint for it.  After a machine crash the store may be behind; recovery
re-adds the ids it lacks from the state log.

Memory: one block cache shared by every store of the process
(:data:`CACHE_BYTES`, index and filter blocks included, partitioned in 4 KiB
pieces so that the cache can hold them whatever the size of a file), bloom
filters, small write buffers (:data:`WRITE_BUFFER_BYTES`, at most two per column family), and
the staged generations (the records in flight).  Nothing per id outlives a
commit.

Deleting a store's directory is safe: the worker finds it empty and re-adds
the ids from the state log on the next start (agents/worker/recovery.py).  A
store of another :data:`FORMAT` is wiped on open for the same reason.

Cost (2M new ids in batches of 5,000, ``benchmarks/dedup_store.py``): the
batched multi-get of ``seen`` (mostly misses: memtable bloom, then one filter
partition per file), then the memtable inserts of ``commit`` (done in digest
order: the skip list inserts next to the previous key), then Python; staging
is bulk (a dict update and a count per bucket) when every id was absent at the
last ``seen`` and is staged nowhere, id by id otherwise.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any, cast

from rocksdict import (
    AccessType,
    BlockBasedIndexType,
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
MAX_WAL_BYTES = 32 * 1024 * 1024  # write-ahead log kept per store before its memtables are flushed
EXPIRE_BUDGET = 50_000  # ids of expired buckets deleted per commit (whole journal entries: one more at most)
JOURNAL_CHUNK = 4096  # ids per journal entry at most
MULTI_GET_KEYS = 1000  # keys per multi-get (_get_many)
META = b"meta"  # 4 bytes: never a 16-byte digest
JOURNAL = "journal"
FORMAT = 2  # the on-disk layout; a store of another format is wiped on open (1: one journal key per id)

_cache: Cache | None = None


def digest(event_id: str) -> bytes:
    return blake2b(event_id.encode(), digest_size=16).digest()


def _digests(ids: Sequence[str]) -> list[bytes]:
    return [blake2b(i.encode(), digest_size=16).digest() for i in ids]


def _get_many(db: Any, keys: list[bytes]) -> list[bytes | None]:
    """``db[keys]``, :data:`MULTI_GET_KEYS` keys at a time.

    A multi-get keeps every data block it read pinned until it returns, one 4 KiB block per key for keys that are
    present and scattered (expiry reads 50,000 of them per commit): up to ~200 MB allocated and freed at once,
    which glibc then keeps.  Measured on one store of 6.7M ids: RSS stepped from 96 to 186 MiB when ids began to
    expire (``malloc_trim`` gave the 90 MiB back), and stays at 99 MiB in pieces of 1,000 keys, at no measurable
    cost in time (docs/performance.md).
    """
    if len(keys) <= MULTI_GET_KEYS:
        return db[keys]
    out: list[bytes | None] = []
    for at in range(0, len(keys), MULTI_GET_KEYS):
        out += db[keys[at:at + MULTI_GET_KEYS]]
    return out


def _b4(bucket: int) -> bytes:
    return bucket.to_bytes(4, "big")


def _options() -> Options:
    global _cache
    if _cache is None:
        _cache = Cache(CACHE_BYTES)
    table = BlockBasedOptions()
    table.set_block_cache(_cache)
    table.set_bloom_filter(10, False)
    table.set_format_version(5)  # the faster bloom filter (the default, 2, is the legacy one)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    # Partitioned index and filters: the cache holds 4 KiB pieces, not one filter of a few MiB per file, which
    # the cache's 512 KiB shards cannot keep, so that every lookup read and parsed it again (7 µs per miss).
    table.set_index_type(BlockBasedIndexType.two_level_index_search())
    table.set_partition_filters(True)
    table.set_metadata_block_size(4096)
    table.set_pin_top_level_index_and_filter(True)
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
    # A write-ahead log, not synced (RocksDedup._open): a killed process loses no commit (the log is in the OS's
    # page cache), so a restart finds the store where the worker left it and recovery reads no records before
    # the newest checkpoint.  A machine crash can lose the latest commits as a whole (the column families
    # flush together), and recovery re-adds their ids from the state log past the position that survived.
    opts.set_atomic_flush(True)
    opts.set_max_total_wal_size(MAX_WAL_BYTES)
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
        elif store._meta_identity is not None and store._meta_format != FORMAT:
            log.warning("dedup store %s has the layout of format %s, not %d: starting it empty",
                        path, store._meta_format, FORMAT)
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
        wo.sync = False
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
        self._meta_format: int | None = m.get("format")
        self._jseq: int = m.get("jseq", 0)  # journal entries written so far (their keys' sequence numbers)
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
            # The memtables to disk (the next open replays no log): the journal first, so that a machine crash
            # in between leaves at worst journal entries without rows (harmless), never rows without entries.
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
        self._meta_format = FORMAT

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

    def _staged_many(self, ds: list[bytes]) -> list[int | None]:
        """The staged bucket of each digest (None: not staged), the newest generation first."""
        got = list(map(self._cur.ids.get, ds))
        for g in reversed(self._gens):
            if None not in got:
                break
            get = g.ids.get
            got = [b if b is not None else get(d) for b, d in zip(got, ds)]
        return got

    def seen(self, ids: Sequence[str]) -> list[bool]:
        db = self._db
        assert db is not None, "dedup store is closed"
        keep = self.keep
        ds = _digests(ids)
        if self._cur.ids or self._gens:
            out = [False] * len(ids)
            absent: dict[str, bytes] = {}
            ask: list[bytes] = []
            where: list[int] = []
            for k, (d, b) in enumerate(zip(ds, self._staged_many(ds))):
                if b is None:
                    ask.append(d)
                    where.append(k)
                elif b >= keep:
                    out[k] = True
                else:
                    absent[ids[k]] = d
            if ask:
                kb = _b4(max(keep, 0))  # buckets are >= 0: their 4 bytes big-endian compare as the numbers
                for k, d, v in zip(where, ask, _get_many(db, ask)):
                    if v is not None and v >= kb:
                        out[k] = True
                    else:
                        absent[ids[k]] = d
            self._absent = absent
            return out
        kb = _b4(max(keep, 0))
        out = [v is not None and v >= kb for v in _get_many(db, ds)] if ds else []
        self._absent = {i: d for i, d, hit in zip(ids, ds, out) if not hit}
        return out

    def add(self, ids: Sequence[str], ts: Sequence[int]) -> None:
        absent, self._absent = self._absent, {}
        if self.replaying:
            return
        db = self._db
        assert db is not None, "dedup store is closed"
        gen = self._cur
        bs = [t // BUCKET_MS for t in ts]
        ds = list(map(absent.get, ids))
        if None not in ds:
            # The common case: every id was absent at the last seen() (so it is not counted anywhere) and is
            # staged nowhere since, each once: the ids go in at once and the counts grow by bucket.
            new: dict[bytes, int] = dict(zip(cast("list[bytes]", ds), bs))
            if len(new) == len(ds) and gen.ids.keys().isdisjoint(new) \
                    and all(g.ids.keys().isdisjoint(new) for g in self._gens):
                gen.ids.update(new)
                delta = gen.delta
                for b, c in Counter(bs).items():
                    delta[b] = delta.get(b, 0) + c
                return
        self._add_slow(ids, bs, ds)

    def _add_slow(self, ids: Sequence[str], bs: list[int], known: list[bytes | None]) -> None:
        """add(), id by id: an id staged or stored already moves from its old bucket's count to the new one."""
        db = self._db
        keep = self.keep
        ds = [d if d is not None else digest(i) for i, d in zip(ids, known)]
        ask = [d for d, k, st in zip(ds, known, self._staged_many(ds)) if k is None and st is None]
        on_disk = {d: int.from_bytes(v, "big") for d, v in zip(ask, _get_many(db, ask)) if v is not None} \
            if ask else {}
        staged = self._cur.ids
        delta = self._cur.delta
        for d, b, k in zip(ds, bs, known):
            old = self._staged(d)
            if old is None and k is None:
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

    def commit(self, position: int, upto: int | None = None, check: int | None = None, tidy: bool = True) -> None:
        """Write the generations sealed up to ``upto`` (all, sealing the current one, if None) and the meta
        key -- ``position`` (the state-log position those records reach) and ``check`` (the source end of
        the record just before it) -- in one atomic write; then forget them from memory.  ``tidy=False``
        leaves the rows of expired ids for the next commit (they already read as forgotten)."""
        db = self._db
        assert db is not None, "dedup store is closed"
        if upto is None:
            upto = self.seal()
        first = self._seq - len(self._gens) + 1  # number of self._gens[0]
        n = max(0, min(upto - first + 1, len(self._gens)))
        done, self._gens = self._gens[:n], self._gens[n:]
        keep = done[-1].keep if done else self._committed_keep
        if len(done) == 1:
            puts = done[0].ids
        else:
            puts = {}
            for g in done:
                puts.update(g.ids)
        counts = self._counts
        for g in done:
            for b, c in g.delta.items():
                counts[b] = counts.get(b, 0) + c
        wb = WriteBatch(raw_mode=True)
        if tidy:
            self._expire_rows(wb, keep, puts)
        if puts:
            # Rows (digest -> bucket) in the default family, in the order of the digests: the memtable's skip
            # list inserts a key next to the previous one cheaply (2-3x faster than in random order).  And the
            # digests of each bucket, concatenated, as journal entries of at most JOURNAL_CHUNK ids:
            # key = bucket (4 bytes) + a sequence number (8 bytes), both big-endian.
            put = wb.put
            ds = sorted(puts)
            enc = {b: _b4(b) for b in set(puts.values())}
            if len(enc) == 1:
                bb = next(iter(enc.values()))
                for d in ds:
                    put(d, bb)
                groups = [(bb, ds)]
            else:
                by: dict[int, list[bytes]] = {b: [] for b in enc}
                for d in ds:
                    b = puts[d]
                    put(d, enc[b])
                    by[b].append(d)
                groups = list(zip(map(enc.__getitem__, by), by.values()))
            jh = self._jh
            jseq = self._jseq
            for bb, group in groups:
                for at in range(0, len(group), JOURNAL_CHUNK):
                    jseq += 1
                    put(bb + jseq.to_bytes(8, "big"), b"".join(group[at:at + JOURNAL_CHUNK]), jh)
            self._jseq = jseq
        self._counts = counts = {b: c for b, c in counts.items() if b >= keep and c}
        self.position, self.check, self._committed_keep = position, check, keep
        meta = {"identity": self.identity, "format": FORMAT, "position": position, "check": check, "keep": keep,
                "jseq": self._jseq, "counts": {str(b): c for b, c in counts.items()}}
        wb.put(META, json.dumps(meta).encode())
        db.write(wb)
        self._meta_identity = self.identity
        self._meta_format = FORMAT

    def _expire_rows(self, wb: WriteBatch, keep: int, puts: dict[bytes, int]) -> int:
        """Stage the deletion of the journal entries of buckets older than ``keep`` (about EXPIRE_BUDGET ids
        at most) and of their rows; how many ids those entries held."""
        db = self._db
        assert db is not None
        if keep <= self._clean_below:
            return 0  # no journal entry older than ``keep`` is left
        end = _b4(max(keep, 0))
        it = self._journal_iter()
        it.seek_to_first()
        keys: list[bytes] = []
        digests: list[bytes] = []
        buckets: list[bytes] = []
        while it.valid() and len(digests) < EXPIRE_BUDGET:
            k = it.key()
            if k >= end:
                break
            v = it.value()
            keys.append(k)
            ds = [v[at:at + 16] for at in range(0, len(v), 16)]
            digests += ds
            buckets += [k[:4]] * len(ds)
            it.next()
        more = it.valid() and it.key() < end
        del it
        if not more:
            self._clean_below = keep  # once this batch is written
        if not keys:
            return 0
        for d, b, v in zip(digests, buckets, _get_many(db, digests)):
            if v is not None and v == b and d not in puts:
                wb.delete(d)
        wb.delete_range(keys[0], keys[-1] + b"\x00", self._jh)
        return len(digests)

    def _journal_iter(self) -> Any:
        return self._journal.iter(ReadOptions())

    def disk_bytes(self) -> int:
        """Bytes of the store's files (tools and benchmarks)."""
        return disk_usage(self.path)


def disk_usage(path: str) -> int:
    """Bytes of the files under ``path`` (0 if it does not exist): a store, or a whole ``state_dir``."""
    total = 0
    for root, _, files in os.walk(path):
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
