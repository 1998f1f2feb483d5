"""Memory: resident bytes per tracked user (in process), and RSS of a live worker under steady load.

    python3 -m benchmarks.memory [--mode per-user] [--users 1000000]
    python3 -m benchmarks.memory --mode soak [--minutes 10] [--rate 5000] [--users 50000]
    python3 -m benchmarks.memory --mode soak --config default --users 1000000 --rate 28000 --minutes 32

``--mode per-user`` (default) builds a PartitionEngine (agents.core.engine)
from ``config.settings.from_mapping`` with default settings and a dedup store
that remembers no event id (every id here is new), and feeds it fake consumer records through
agents.ingest.process_messages (as benchmarks/engine_only.py does), in chunks
that are dropped after use.  Each case runs in a fresh interpreter:

* ``one event``: one page_view for each of ``--users`` distinct users;
* ``realistic mix``: six events per user (signup with a channel,
  session_start, two page_views, a purchase for a third of the users else a
  login, app_open or invite), in six rounds over the user base.

Event time advances 1 ms per event, so nothing crosses a day boundary (no
closed periods).  After every chunk of 4000 records a watermark marker at
the chunk's last event (as a backfill sends them) applies the instants waiting,
so no transient peak hides in the RSS; a final marker past the last event leaves
only per-user state (until December 2026 the store was a ``MemoryDedup`` with a
1 s horizon, but it forgets a whole hour of event time at once, which this feed
never reaches: the figures then included ~3.6M ids);
``gc.collect()``; RSS is read from /proc/self/statm before the first event and
after.  bytes/user = delta / users.
With the default ``dedup_horizon: 7d`` a live worker also keeps every event_id
of the last 7 days of event time, on disk (see the soak mode for that share).

``--mode soak`` runs Apache Kafka and one live ``kpimon worker`` child process
(clock live, lateness 5s, dedup_horizon 1m, the short lifecycle thresholds of
config/demo.yaml: silent 20s, sleeping 40s, churned 80s, dead 160s) under
steady load from agents.simulator.Simulator (``--users``, time compressed so
that the model emits about ``--rate`` events/s, ts = the wall clock, a
120-simulated-day warm-up that is not sent), and samples the worker's VmRSS
(/proc/<pid>/status) every ``--interval`` seconds together with the accepted
counter and the tracked population from /metrics.  ``--source pool`` replaces
the simulator by uniform traffic over exactly ``--users`` user_ids (a strictly
bounded user base).  The plateau check looks at the samples after the
warm-up: the first half of the run, or with ``--config default`` until the dedup
horizon of event time is full plus 3 minutes (ids expire from then on, and the
stores stop growing); the RSS slope there must be under 0.5 MB/min, or that of
its second half under a quarter of its first half's (still settling).  Dedup state (1 min) and closed
periods expire, so RSS should flatten once the user base is known; the
simulator keeps signing up new users (users/90 per simulated day), which shows
as a small residual slope next to the population column.

Prints tables; results go to benchmarks/results/memory.json under the keys
``per_user`` and ``soak``.

``--config default`` soaks the packaged default settings instead (7-day
``dedup_horizon``, 5-minute ``lateness``, default lifecycle thresholds, dedup
store on disk) with event time compressed: the worker runs the event clock,
and the pool's events carry ``ts`` = start + ``--event-speed`` x the wall time
elapsed (default 600: 30 minutes of running cover 12.5 days of event time,
so the dedup horizon fills up and then expires as it goes), each event up to
60 s of event time behind at random (within lateness).  Each sample also
reads the disk used by the worker's ``state_dir`` (its dedup stores).  The
report compares the peak RSS with the target 200 B x users + 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import multiprocessing as mp
import os
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import _live

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z


# ---------------------------------------------------------------- per-user (in process)
class _Msg:
    """The fields of an aiokafka ConsumerRecord that process_messages reads."""

    __slots__ = ("offset", "value", "headers", "key", "topic")

    def __init__(self, offset: int, value: bytes) -> None:
        self.offset = offset
        self.value = value
        self.headers = ()
        self.key = None
        self.topic = "t"


_MIX = (
    b'{"event_id":"m%d","user_id":"user-%d","type":"signup","channel":"organic","ts":%d}',
    b'{"event_id":"m%d","user_id":"user-%d","type":"session_start","ts":%d}',
    b'{"event_id":"m%d","user_id":"user-%d","type":"page_view","ts":%d}',
    b'{"event_id":"m%d","user_id":"user-%d","type":"page_view","ts":%d}',
)
_ROUND5 = (
    b'{"event_id":"m%d","user_id":"user-%d","type":"purchase","amount":"24.99","ts":%d}',
    b'{"event_id":"m%d","user_id":"user-%d","type":"login","ts":%d}',
    b'{"event_id":"m%d","user_id":"user-%d","type":"login","ts":%d}',
)
_ROUND6 = (
    b'{"event_id":"m%d","user_id":"user-%d","type":"app_open","ts":%d}',
    b'{"event_id":"m%d","user_id":"user-%d","type":"invite","ts":%d}',
)
_ONE = b'{"event_id":"e%d","user_id":"user-%d","type":"page_view","ts":%d}'


def _template(case: str, rnd: int, user: int) -> bytes:
    if case == "one":
        return _ONE
    if rnd < 4:
        return _MIX[rnd]
    if rnd == 4:
        return _ROUND5[user % 3]
    return _ROUND6[0 if user % 10 else 1]


def _measure(case: str, users: int, chunk: int = 4000) -> dict[str, Any]:
    """Runs in a fresh interpreter: RSS delta of feeding ``users`` users into one engine."""
    from kpimon.agents.core.batch import process_messages
    from kpimon.agents.core.dedup import NoDedup
    from kpimon.agents.core.engine import EngineConfig, PartitionEngine
    from kpimon.config.settings import from_mapping
    from kpimon.streams.events import Decoder

    settings = from_mapping({"dedup_horizon": "1s"}, "<bench>", env={})
    # Every event id here is new: a store that remembers none keeps the ids out of the per-user figure (the
    # dedup store forgets a whole hour of event time at once, which this feed never reaches; in a worker the
    # ids live on disk, measured by the soak).
    engine = PartitionEngine(EngineConfig.from_settings(settings), NoDedup(settings.dedup_horizon))
    dec = Decoder(settings.money.decimals)
    label = settings.channel_label
    rounds = 1 if case == "one" else 6
    gc.collect()
    rss0 = _live.statm_rss()
    t0 = time.perf_counter()
    n = 0
    offset = 0
    for rnd in range(rounds):
        for base in range(0, users, chunk):
            msgs = []
            for u in range(base, min(users, base + chunk)):
                msgs.append(_Msg(offset, _template(case, rnd, u) % (n, u, START + n)))
                offset += 1
                n += 1
            pos = 0
            while pos < len(msgs):
                _, pos = process_messages(engine, dec, msgs, pos, msgs[pos].offset, None, label)
            # A watermark marker at the chunk's last event (as a backfill would send): applies the
            # reorder buffer and expires event_ids as we go, so no transient peak hides in the RSS.
            engine.advance(marker=START + n - 1)
            engine.take_outbox()
            engine.take_transitions()
    feed_s = time.perf_counter() - t0
    rss_fed = _live.statm_rss()
    engine.advance(marker=START + n + settings.dedup_horizon + 1000)  # apply all, expire every event_id
    engine.take_outbox()
    engine.take_transitions()
    gc.collect()
    rss1 = _live.statm_rss()
    tracked = sum(engine.population())
    return {
        "case": case, "users": users, "events": n, "events_per_user": n / users, "feed_s": feed_s,
        "rss_before": rss0, "rss_fed": rss_fed, "rss_after": rss1, "bytes_per_user": (rss1 - rss0) / users,
        "fed_bytes_per_user": (rss_fed - rss0) / users, "tracked_users": tracked,
        "dedup_left": _size(engine, "dedup"), "buffer_left": _size(engine, "buffer"),
        "accepted": engine.totals.accepted,
    }


def _size(engine: Any, attr: str) -> int | None:
    try:
        return len(getattr(engine, attr))
    except (AttributeError, TypeError):
        return None


def per_user(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    ctx = mp.get_context("spawn")
    for case, label in (("one", "one event per user"), ("mix", "realistic mix (6 events/user)")):
        print(f"measuring {label}, {args.users:,} users ...", flush=True)
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            r = pool.submit(_measure, case, args.users).result()
        r["label"] = label
        results.append(r)
    mb = 1024 * 1024
    print(f"\nmemory per tracked user: {args.users:,} users, one PartitionEngine, default settings, "
          "a dedup store that remembers no id")
    print(f"{'case':32} {'events':>10} {'feed s':>7} {'RSS before':>11} {'RSS fed':>9} {'RSS after':>10} "
          f"{'bytes/user':>11} {'users':>9}")
    for r in results:
        print(f"{r['label']:32} {r['events']:>10,} {r['feed_s']:>7.1f} {r['rss_before'] / mb:>9.1f}MB "
              f"{r['rss_fed'] / mb:>7.1f}MB {r['rss_after'] / mb:>8.1f}MB {r['bytes_per_user']:>11,.0f} "
              f"{'-' if r['tracked_users'] is None else format(r['tracked_users'], ','):>9}")
    print("notes: a watermark marker after every chunk of 4000 records applies the instants waiting (so they "
          "never hold more than ~4000 events); no event id is remembered (in a worker they are on disk: the "
          "soak); 'RSS fed' is right after the last event, 'RSS after' after a "
          "final marker and gc.collect(). user_ids are 'user-<n>' (6-12 characters). RSS includes allocator "
          "slack (dict growth steps, pymalloc arenas), which is what a worker pays too.")
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), **_live.machine(),
            "dedup_horizon": "1s", "cases": results}


# ---------------------------------------------------------------- soak (live worker)
async def _soak_load(args: argparse.Namespace, bootstrap: str, topic: str, partitions: int, workers: Any,
                     url: str, samples: list, state_dir: str | None = None) -> dict[str, Any]:
    from kpimon.agents.tools.simulator import DAY_MS, EVENTS_PER_USER_DAY, Simulator
    from kpimon.agents.worker.dedup_store import disk_usage

    producer = _live.new_producer(bootstrap)
    await producer.start()
    pid = workers.procs[0].pid
    part_cache: dict[bytes, int] = {}

    def part(key: bytes) -> int:
        p = part_cache.get(key)
        if p is None:
            p = part_cache[key] = _live.partition_of(key, partitions)
        return p

    sim = None
    if args.source == "simulator":
        time_scale = args.rate * 86_400 / (EVENTS_PER_USER_DAY * args.users)
        sim = Simulator(args.seed, users=args.users, time_scale=time_scale)
        day = DAY_MS / time_scale
        t = time.perf_counter()
        now_ms = int(time.time() * 1000)
        w0 = now_ms - int(args.warmup_days * day)
        for k in range(int(args.warmup_days)):  # in steps, so that the pending list stays small
            sim.raw_between(int(w0 + k * day), int(w0 + (k + 1) * day))
        last_ms = int(time.time() * 1000)
        sim.raw_between(now_ms, last_ms)  # what the warm-up took in wall time: not sent either
        print(f"simulator: {args.users:,} users, 1 simulated day = {day / 1000:.1f}s, warm-up of "
              f"{args.warmup_days:g} simulated days in {time.perf_counter() - t:.0f}s "
              f"({len(sim.population):,} users signed up so far)", flush=True)
    else:
        last_ms = int(time.time() * 1000)
    speed = args.event_speed if args.config == "default" else None
    start_ms = 1_767_225_600_000  # 2026-01-01T00:00:00Z: event time of the compressed run
    jitter = random.Random(args.seed)
    t0 = time.time()
    t_end = t0 + args.minutes * 60
    next_sample = t0
    produced = 0
    futures: list = []
    cpu_prev = None
    tick = 0.1
    try:
        while True:
            now = time.time()
            if now >= next_sample:
                workers.check()
                rss = _live.vm_rss(pid)
                cpu = _live.proc_cpu(pid)
                try:
                    body = _live.get(url)
                    accepted, population = _live.events_total(body), _live.lifecycle_users(body)
                except OSError:
                    accepted = population = None
                cpu_pct = None
                if cpu_prev is not None and cpu is not None:
                    cpu_pct = 100 * (cpu - cpu_prev[1]) / (now - cpu_prev[0])
                cpu_prev = (now, cpu)
                s = {"t": now - t0, "rss": rss, "accepted": accepted, "produced": produced,
                     "population": population, "worker_cpu_pct": cpu_pct,
                     "state_disk": disk_usage(state_dir) if state_dir else None}
                samples.append(s)
                print(_row(s, samples[0]), flush=True)
                next_sample += args.interval
                if now >= t_end:
                    break
            now_ms = int(now * 1000)
            if sim is not None:
                evs = sim.raw_between(last_ms, now_ms)
                items = [(ev[2].uid.encode(), sim.to_line(ev)) for ev in evs]
            else:
                n = int((now - t0) * args.rate) - produced
                items = []
                ts = now_ms if speed is None else start_ms + int((now - t0) * 1000 * speed)
                for j in range(produced, produced + n):
                    u = (j * 7919) % args.users
                    t = ts if speed is None else ts - int(jitter.random() ** 8 * 60_000)
                    items.append((b"u%d" % u, _POOL[j % len(_POOL)] % (j, u, t)))
            last_ms = now_ms
            if items:
                batches: dict[int, Any] = {}
                for key, value in items:
                    p = part(key)
                    b = batches.get(p)
                    if b is None:
                        b = batches[p] = producer.create_batch()
                    if b.append(key=key, value=value, timestamp=None) is None:
                        futures.append(await producer.send_batch(b, topic, partition=p))
                        b = batches[p] = producer.create_batch()
                        b.append(key=key, value=value, timestamp=None)
                for p, b in batches.items():
                    futures.append(await producer.send_batch(b, topic, partition=p))
                produced += len(items)
                futures = [f for f in futures if not f.done()]
            delay = tick - (time.time() - now)
            await asyncio.sleep(max(0.0, delay))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {"produced": produced, "seconds": time.time() - t0,
            "signed_up_in_simulator": len(sim.population) if sim is not None else args.users}


_POOL = (
    b'{"event_id":"s%d","user_id":"u%d","type":"page_view","ts":%d}',
    b'{"event_id":"s%d","user_id":"u%d","type":"session_start","ts":%d}',
    b'{"event_id":"s%d","user_id":"u%d","type":"login","ts":%d}',
    b'{"event_id":"s%d","user_id":"u%d","type":"purchase","amount":"9.99","ts":%d}',
    b'{"event_id":"s%d","user_id":"u%d","type":"page_view","ts":%d}',
    b'{"event_id":"s%d","user_id":"u%d","type":"signup","channel":"email","ts":%d}',
)


def _row(s: dict, first: dict) -> str:
    mb = 1024 * 1024
    rss = "-" if s["rss"] is None else f"{s['rss'] / mb:8.1f}"
    d = "-" if s["rss"] is None or first["rss"] is None else f"{(s['rss'] - first['rss']) / mb:+8.1f}"
    acc = "-" if s["accepted"] is None else f"{s['accepted']:,.0f}"
    pop = "-" if s["population"] is None else f"{s['population']:,.0f}"
    cpu = "-" if s["worker_cpu_pct"] is None else f"{s['worker_cpu_pct']:.0f}%"
    return f"{s['t']:7.0f}s  RSS {rss} MB ({d})  accepted {acc:>12}  users {pop:>8}  worker CPU {cpu:>5}"


def soak(args: argparse.Namespace) -> dict[str, Any]:
    from kpimon.agents.runtime.apache_kafka import ApacheKafka
    from kpimon.agents.runtime.ports import free_port
    from kpimon.agents.tools import backfill as bf
    from kpimon.agents.tools.demo import DEMO_CONFIG
    from kpimon.config.settings import from_mapping, load
    from kpimon.streams import admin
    from kpimon.streams.topics import Topics

    info = _live.machine()
    demo = load(DEMO_CONFIG)
    samples: list[dict] = []
    prefix = f"soak-{uuid.uuid4().hex[:8]}."
    with ApacheKafka() as broker, tempfile.TemporaryDirectory(prefix="kpimon-bench-soak-") as tmp:
        bootstrap = broker.bootstrap
        # agents.backfill.worker_settings: the demo config with this broker, prefix and port, live clock,
        # session timeout 3s (and whatever else it adapts, e.g. the KPI spec's path made absolute).
        state_dir = os.path.join(tmp, "state")  # replaced by each worker's own (benchmarks/_live.py Workers)
        if args.config == "default":
            # The packaged defaults (7d dedup_horizon, 5m lateness, dedup store on disk), event time compressed.
            data = bf.worker_settings(from_mapping({}, "<defaults>", env={}), broker=f"kafka://{bootstrap}",
                                      prefix=prefix, partitions=args.partitions, web_port=free_port(),
                                      state_dir=state_dir, clock="event")
        else:
            data = bf.worker_settings(demo, broker=f"kafka://{bootstrap}", prefix=prefix,
                                      partitions=args.partitions, web_port=free_port(), state_dir=state_dir,
                                      clock="live")
            data.update(lateness="5s", dedup_horizon="1m")
        settings = from_mapping(data, "<bench>", env={})
        topics = Topics(prefix, settings.worker.app_id)
        admin.ensure_topics(bootstrap, topics, args.partitions)
        workers = _live.Workers(settings.model_dump(mode="json"), 1, tmp)
        try:
            workers.wait_ready(args.partitions)
            url = f"http://127.0.0.1:{workers.ports[0]}/metrics"
            print(f"worker pid {workers.procs[0].pid} ready; {args.rate:,.0f} events/s target, source "
                  f"{args.source}, sampling VmRSS every {args.interval:g}s for {args.minutes:g} min", flush=True)
            load_info = asyncio.run(_soak_load(args, bootstrap, topics.events, args.partitions, workers, url,
                                               samples, workers.state_dirs[0]))
        finally:
            workers.stop()
            _live.write_json(_live.RESULTS / "memory-soak-samples.json", {"samples": samples})
    return report_soak(samples, args, load_info, info, settings)


SETTLE_S = 180  # soak --config default: seconds of warm-up after the dedup horizon is first full
FLAT_MB_PER_MIN = 0.5  # the RSS slope after warm-up below which the curve counts as flat


def report_soak(samples: list[dict], args: argparse.Namespace, load_info: dict, info: dict,
                settings: Any) -> dict[str, Any]:
    lifecycle = settings.lifecycle.model_dump(mode="json")
    conf = {"clock": settings.worker.clock, "lateness": f"{settings.lateness // 1000}s",
            "dedup_horizon": f"{settings.dedup_horizon // 1000}s", "dedup_store": settings.worker.dedup_store}
    mb = 1024 * 1024
    good = [s for s in samples if s["rss"] is not None]
    half = len(good) // 2
    first, last = good[:half + 1], good[half:]

    def per_min(part: list[dict], key: str, scale: float) -> float | None:
        if len(part) < 2 or any(s[key] is None for s in part):
            return None
        return _live.slope([s["t"] / 60 for s in part], [s[key] / scale for s in part])

    s1, s2 = per_min(first, "rss", mb), per_min(last, "rss", mb)
    u1, u2 = per_min(first, "population", 1), per_min(last, "population", 1)
    ratio = (s2 / s1) if s1 else None
    # Warm-up: with the default settings, until the dedup horizon of event time is full and its first ids have
    # expired for a while (the store's size only stops growing then); otherwise the first half of the run.
    if args.config == "default":
        warm_s = settings.dedup_horizon / args.event_speed / 1000 + SETTLE_S
    else:
        warm_s = good[half]["t"] if good else 0.0
    after = [s for s in good if s["t"] >= warm_s]
    s_after = per_min(after, "rss", mb)
    mid = len(after) // 2
    sa, sb = per_min(after[:mid + 1], "rss", mb), per_min(after[mid:], "rss", mb)
    plateau: bool | None = None
    if len(after) >= 6 and s_after is not None:
        plateau = abs(s_after) < FLAT_MB_PER_MIN or (sa is not None and sb is not None and sa > 0
                                                     and sb < 0.25 * sa)
    # In the last half, how many RSS bytes came with each newly tracked user?
    per_new_user = None
    if len(last) >= 2 and last[-1]["population"] is not None and last[0]["population"] is not None:
        grew = last[-1]["population"] - last[0]["population"]
        if grew > 0:
            per_new_user = (last[-1]["rss"] - last[0]["rss"]) / grew
    rate = load_info["produced"] / load_info["seconds"]

    def fmt(v: float | None, spec: str, width: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{format(v, spec):>{width}}"

    print(f"\nsoak: worker VmRSS under {rate:,.0f} events/s produced (target {args.rate:,.0f}), source "
          f"{args.source}, {args.users:,} users, {args.partitions} partitions, {args.config} settings {conf}; "
          f"{len(good)} samples over {load_info['seconds']:.0f}s")
    print(f"{'half':6} {'RSS slope MB/min':>17} {'tracked users/min':>18}")
    print(f"{'first':6} {fmt(s1, '.2f', 17)} {fmt(u1, ',.0f', 18)}")
    print(f"{'last':6} {fmt(s2, '.2f', 17)} {fmt(u2, ',.0f', 18)}")
    if good:
        print(f"RSS first {good[0]['rss'] / mb:.1f} MB, peak {max(s['rss'] for s in good) / mb:.1f} MB, "
              f"last {good[-1]['rss'] / mb:.1f} MB; last/first-half slope ratio {fmt(ratio, '.2f', 1).strip()}; "
              f"last half: {fmt(per_new_user, ',.0f', 1).strip()} bytes of RSS per newly tracked user")
    if after:
        print(f"after warm-up (from {warm_s:.0f}s, {len(after)} samples): RSS {min(x['rss'] for x in after) / mb:.1f}"
              f"-{max(x['rss'] for x in after) / mb:.1f} MB, slope {fmt(s_after, '.2f', 1).strip()} MB/min "
              f"(its halves {fmt(sa, '.2f', 1).strip()} and {fmt(sb, '.2f', 1).strip()})")
    if plateau is None:
        print(f"plateau: UNDECIDED -- fewer than 6 samples after the warm-up ({warm_s:.0f}s); run longer")
    else:
        print("plateau: " + (f"YES (after warm-up: slope < {FLAT_MB_PER_MIN} MB/min, or its second half's < 25% of "
                             "its first half's)" if plateau else "NO -- RSS still growing after the warm-up")
              + "; each newly tracked user stays in memory for good, so a residual slope that matches "
                "'tracked users/min' x bytes per user (benchmarks.memory --mode per-user) is not a leak")
    target = 200 * args.users + 300 * mb
    disk_last = next((s["state_disk"] for s in reversed(samples) if s.get("state_disk") is not None), None)
    accepted_last = next((s["accepted"] for s in reversed(samples) if s.get("accepted") is not None), None)
    if good:
        peak = max(s["rss"] for s in good)
        print(f"RSS target 200 B x {args.users:,} users + 300 MB = {target / mb:,.0f} MB: peak {peak / mb:,.0f} MB "
              f"({'within' if peak <= target else 'ABOVE'} it)")
    if disk_last is not None and accepted_last:
        # Ids kept at the end: the events of the last dedup_horizon of event time (in wall seconds: / speed).
        speed = args.event_speed if args.config == "default" else 1.0
        horizon_wall_s = settings.dedup_horizon / 1000 / speed
        kept = min(accepted_last, accepted_last / load_info["seconds"] * horizon_wall_s)
        print(f"state_dir (dedup stores) {disk_last / mb:,.0f} MB at the end, {accepted_last:,.0f} events accepted, "
              f"about {kept:,.0f} ids within the horizon: {disk_last / mb / max(1.0, kept / 1e6):,.1f} MB per "
              "million ids")
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), **info, "broker": "apache",
            "source": args.source, "target_rate": args.rate, "achieved_rate": rate, "users": args.users,
            "partitions": args.partitions, "minutes": args.minutes, "interval_s": args.interval,
            "config": args.config, "event_speed": args.event_speed if args.config == "default" else None,
            "settings": {**conf, "lifecycle": lifecycle}, "rss_target_bytes": target,
            "state_disk_bytes_last": disk_last, "accepted_last": accepted_last,
            "samples": samples, "rss_slope_mb_per_min": {"first_half": s1, "last_half": s2},
            "population_slope_per_min": {"first_half": u1, "last_half": u2}, "slope_ratio": ratio,
            "rss_bytes_per_new_user_last_half": per_new_user, "warmup_s": warm_s,
            "rss_slope_after_warmup_mb_per_min": s_after, "plateau": plateau, **load_info}


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.memory",
        description="Memory: bytes of RSS per tracked user (in process, --mode per-user) or the RSS of a live "
                    "worker under steady load (--mode soak).",
        epilog="Full runs: --mode per-user --users 1000000 (the default); --mode soak --minutes 10.")
    ap.add_argument("--mode", choices=["per-user", "soak"], default="per-user")
    ap.add_argument("--users", type=int, default=None,
                    help="per-user: distinct users (default 1000000); soak: user base (default 50000)")
    ap.add_argument("--minutes", type=float, default=10, help="soak: duration (default 10)")
    ap.add_argument("--rate", type=float, default=5000, help="soak: target events/s (default 5000)")
    ap.add_argument("--interval", type=float, default=10, help="soak: seconds between RSS samples (default 10)")
    ap.add_argument("--partitions", type=int, default=4, help="soak: partitions (default 4)")
    ap.add_argument("--source", choices=["simulator", "pool"], default="simulator",
                    help="soak: simulator traffic (default) or uniform traffic over exactly --users users")
    ap.add_argument("--warmup-days", type=float, default=120, help="soak: simulated days before the run, not sent")
    ap.add_argument("--config", choices=["demo", "default"], default="demo",
                    help="soak: demo settings, live clock, short horizons (default); or the packaged default "
                         "settings with event time compressed (event clock, see --event-speed)")
    ap.add_argument("--event-speed", type=float, default=600,
                    help="soak --config default: event milliseconds per wall millisecond (default 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(_live.RESULTS / "memory.json"))
    args = ap.parse_args()
    if args.mode == "per-user":
        args.users = args.users or 1_000_000
        result = per_user(args)
        key = "per_user"
    else:
        args.users = args.users or 50_000
        result = soak(args)
        key = "soak"
    out = Path(args.out)
    try:
        data = json.loads(out.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = result
    _live.write_json(out, data)


if __name__ == "__main__":
    main()
