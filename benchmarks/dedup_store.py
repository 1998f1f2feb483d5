"""Dedup stores compared: RocksDedup (on disk, agents/worker/dedup_store.py) vs MemoryDedup (dicts).

    python3 -m benchmarks.dedup_store [N_IDS] [--buckets B]

N ids (default 2,000,000), all distinct, in batches of 5,000 as the worker
does: ``seen`` (one batched lookup), ``add``, and for RocksDedup ``seal`` +
``commit`` (the write after the state-log acknowledgement).  Each store runs
in its own fresh process.  Prints µs per event, the RSS growth of the
process, the disk used per million ids, and the cost of forgetting one bucket
(the ids are spread over B one-hour buckets of event time, default 20).  No
assertions: figures only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time

from kpimon.agents.core.dedup import BUCKET_MS

BATCH = 5000
T0 = 1_704_067_200_000
HORIZON = 7 * 86_400_000


def rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(kind: str, n: int, buckets: int, out: mp.Queue) -> None:
    from kpimon.agents.core.dedup import MemoryDedup
    from kpimon.agents.worker.dedup_store import RocksDedup

    tmp = tempfile.mkdtemp(prefix="kpimon-bench-dedup-")
    try:
        base = rss()
        store = RocksDedup.open(os.path.join(tmp, "dedup-0"), "bench", HORIZON) if kind == "rocks" \
            else MemoryDedup(HORIZON)
        per_bucket = -(-n // buckets)
        t = 0.0
        dups = 0
        for start in range(0, n, BATCH):
            ids = [f"evt-{i:012d}" for i in range(start, min(n, start + BATCH))]
            ts = [T0 + (i // per_bucket) * BUCKET_MS + (i % per_bucket) * (BUCKET_MS // per_bucket)
                  for i in range(start, start + len(ids))]
            t0 = time.perf_counter()
            dups += sum(store.seen(ids))
            store.add(ids, ts)
            if kind == "rocks":
                store.commit(start // BATCH + 1, upto=store.seal())
            t += time.perf_counter() - t0
        grown = rss() - base
        # lookups of ids that are there (a duplicate storm)
        t0 = time.perf_counter()
        for start in range(0, min(n, 500_000), BATCH):
            dups += sum(store.seen([f"evt-{i:012d}" for i in range(start, start + BATCH)]))
        hit_s = time.perf_counter() - t0
        disk = 0
        if kind == "rocks":
            store._db.flush()
            disk = store.disk_bytes()
        # forget every bucket: the watermark passes the horizon after the last one
        t0 = time.perf_counter()
        store.expire(T0 + buckets * BUCKET_MS + HORIZON)
        commits = 0
        if kind == "rocks":
            pos = n // BATCH + 2
            while True:
                store.commit(pos)
                pos += 1
                commits += 1
                if store._clean_below >= store.keep:
                    break
        exp_s = time.perf_counter() - t0
        left = len(store)
        if kind == "rocks":
            store.close()
        out.put(dict(kind=kind, us=t / n * 1e6, hit_us=hit_s / min(n, 500_000) * 1e6, rss=grown,
                     disk_per_m=disk / n * 1e6, exp_per_bucket_ms=exp_s / buckets * 1e3, commits=commits,
                     left=left, dups=dups))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="?", type=int, default=2_000_000)
    ap.add_argument("--buckets", type=int, default=20)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{args.n:,} distinct ids in batches of {BATCH}, over {args.buckets} one-hour buckets")
    print(f"{'store':8} {'µs/event':>9} {'µs/hit':>7} {'RSS growth':>11} {'disk/1M ids':>12} "
          f"{'expiry/bucket':>14}")
    for kind in ("memory", "rocks"):
        q: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=run, args=(kind, args.n, args.buckets, q))
        proc.start()
        r = q.get()
        proc.join()
        disk = f"{r['disk_per_m'] / 2**20:.1f} MiB" if kind == "rocks" else "-"
        print(f"{kind:8} {r['us']:9.2f} {r['hit_us']:7.2f} {r['rss'] / 2**20:8.0f} MiB {disk:>12} "
              f"{r['exp_per_bucket_ms']:11.1f} ms" + (f"  ({r['commits']} commits)" if r["commits"] else ""))
        if r["left"]:
            print(f"  {r['left']} ids left after expiry")


if __name__ == "__main__":
    main()
