"""End-to-end backfill throughput next to the raw aiokafka consume rate of the same topic.

    python3 -m benchmarks.backfill_throughput [--events 1000000] [--partitions 4] [--broker apache|tansu]

Steps, back to back on one broker:
1. generate the simulator's realistic mix (agents.tools.datasets.generate) and produce it;
2. raw ceiling: aiokafka ``getmany`` over the whole topic (bytes only, then with orjson); then the floor
   of any pure-Python pipeline on top of it: the same loop with kpimon's own decode (streams.events.Decoder:
   msgspec, validation, the ``Event``), then also its 128-bit BLAKE2b digest checked against an in-memory
   set (dedup at its cheapest: no disk, no horizon).  No engine, no writes: what a worker can never beat;
3. the real pipeline: ``kpimon worker`` (child process, event clock) from offset 0 to the
   final aggregated watermark.  "steady" excludes worker start-up: it runs from the first
   progress message to the last.

Prints a table and writes benchmarks/results/backfill_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from hashlib import blake2b
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from kpimon.agents.runtime.ports import free_port
from kpimon.agents.tools import backfill as bf
from kpimon.agents.tools.datasets import generate
from kpimon.config.settings import from_mapping
from kpimon.streams import admin
from kpimon.streams import topics as wire
from kpimon.streams.events import Decoder
from kpimon.streams.topics import Topics

START = 1_704_067_200_000


RAW, JSON, DECODE, DEDUP = "raw", "orjson", "decode", "decode+dedup"


async def raw_consume(bootstrap: str, topic: str, partitions: int, total: int, mode: str = RAW) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=32 * 1024 * 1024)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        t0 = time.perf_counter()
        loads = orjson.loads
        decode = Decoder().decode
        ids: set[bytes] = set()
        while seen < total:
            got = await consumer.getmany(timeout_ms=1000, max_records=20000)
            for msgs in got.values():
                seen += len(msgs)
                if mode == JSON:
                    for m in msgs:
                        if m.value:
                            loads(m.value)
                elif mode != RAW:
                    for m in msgs:
                        try:
                            ev = decode(m.value)
                        except Exception:  # noqa: BLE001 - markers and bad lines: a worker refuses them too
                            continue
                        if mode == DEDUP:
                            d = blake2b(ev.event_id.encode(), digest_size=16).digest()
                            if d not in ids:
                                ids.add(d)
        return time.perf_counter() - t0
    finally:
        await consumer.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--broker", choices=["apache", "tansu"], default="apache")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "backfill_throughput.json"))
    args = ap.parse_args()

    if args.broker == "apache":
        from kpimon.agents.runtime.apache_kafka import ApacheKafka as Broker
    else:
        from kpimon.agents.runtime.tansu import TansuBroker as Broker

    t = time.perf_counter()
    lines = list(generate(args.events, start_ms=START, seed=1, users=args.users))
    gen_s = time.perf_counter() - t
    n = len(lines)
    with Broker() as broker, tempfile.TemporaryDirectory() as tmp:
        bootstrap = broker.bootstrap
        settings = from_mapping({"kafka": {"broker": f"kafka://{bootstrap}", "topic_prefix": "bench.",
                                           "partitions": args.partitions},
                                 "worker": {"clock": "event", "web_port": free_port(), "session_timeout": "3s"}},
                                "<bench>", env={})
        topics = Topics("bench.", settings.worker.app_id)
        admin.ensure_topics(bootstrap, topics, args.partitions)
        t = time.perf_counter()
        admin.produce_lines(bootstrap, topics.events, lines)
        produce_s = time.perf_counter() - t
        until = bf.scan_max_ts(lines[-5000:]) + 86_400_000
        admin.send_watermark(bootstrap, topics.events, args.partitions, until)
        total = n + args.partitions

        raw_s = asyncio.run(raw_consume(bootstrap, topics.events, args.partitions, total, RAW))
        raw_json_s = asyncio.run(raw_consume(bootstrap, topics.events, args.partitions, total, JSON))
        decode_s = asyncio.run(raw_consume(bootstrap, topics.events, args.partitions, total, DECODE))
        dedup_s = asyncio.run(raw_consume(bootstrap, topics.events, args.partitions, total, DEDUP))

        data = settings.model_dump(mode="json")
        data["worker"]["state_dir"] = os.path.join(tmp, "state")  # this run's own dedup stores
        cfg = bf.write_config(data, tmp)
        t_start = time.perf_counter()
        worker = bf.spawn_worker(cfg, os.path.join(tmp, "worker.log"))
        partials_reader = _FirstProgress(bootstrap, topics.partials)
        reader = bf.PeriodsReader(bootstrap, topics.periods)
        try:
            first = None
            while reader.watermark is None or reader.watermark.watermark < until:
                if worker.poll() is not None:
                    raise SystemExit(Path(tmp, "worker.log").read_text()[-3000:])
                if first is None:
                    first = partials_reader.poll()
                reader.poll(200)
            t_end = time.perf_counter()
        finally:
            usage = _child_cpu(worker)
            bf.stop_worker(worker)
            reader.close()
            partials_reader.close()
        accepted = reader.watermark.totals["accepted"]
        e2e_s = t_end - t_start
        steady_s = t_end - (first or t_start)

    rows = [
        ("generate (simulator)", n, gen_s),
        ("produce (kafka-python)", n, produce_s),
        ("raw aiokafka getmany", n, raw_s),
        ("raw aiokafka + orjson", n, raw_json_s),
        ("floor: raw + kpimon decode", n, decode_s),
        ("floor: raw + decode + 128-bit digest in a set", n, dedup_s),
        ("kpimon end to end (incl. start-up)", n, e2e_s),
        ("kpimon steady (first progress -> final watermark)", n, steady_s),
    ]
    print(f"\nbackfill throughput: {n:,} events, {args.partitions} partitions, broker={args.broker}, "
          f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}")
    print(f"{'path':52} {'seconds':>9} {'events/s':>12}")
    for name, count, secs in rows:
        print(f"{name:52} {secs:9.2f} {count / secs:12,.0f}")
    ratio = raw_s / steady_s
    print(f"\nkpimon steady / raw consume ceiling = {ratio:.3f}; accepted {accepted:,}")
    print(f"pure-Python floor / raw: decode {raw_s / decode_s:.3f}, decode + dedup in memory {raw_s / dedup_s:.3f}")
    if usage is not None:
        print(f"worker CPU: {usage:.1f} s ({usage / n * 1e6:.1f} µs per event)")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "events": n,
        "partitions": args.partitions, "broker": args.broker, "cores": os.cpu_count(),
        "rates": {name: count / secs for name, count, secs in rows}, "ratio_steady_to_raw": ratio,
        "floor_ratios": {"decode": raw_s / decode_s, "decode+dedup": raw_s / dedup_s},
        "worker_cpu_s": usage, "accepted": accepted,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


class _FirstProgress:
    """Time of the first progress message on the partials topic (the worker started working)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer
        from kafka import TopicPartition as KTP

        self._c = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
        self._c.assign([KTP(topic, 0)])

    def poll(self) -> float | None:
        for recs in self._c.poll(timeout_ms=50).values():
            for rec in recs:
                msg = wire.decode_partials(rec.value)
                if isinstance(msg, wire.Progress) and msg.totals.get("accepted"):
                    return time.perf_counter()
        return None

    def close(self) -> None:
        self._c.close()


def _child_cpu(proc) -> float | None:
    try:
        with open(f"/proc/{proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


if __name__ == "__main__":
    main()
