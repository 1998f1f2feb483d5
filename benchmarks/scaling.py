"""End-to-end throughput by partition count and worker count, next to the raw consume ceiling.

    python3 -m benchmarks.scaling [--events 300000] [--partitions 1,2,4] [--workers 1,2]

One Apache Kafka broker (agents.runtime.apache_kafka.ApacheKafka) for the whole
run, warmed up first (100k events produced and consumed on a scratch topic).
The dataset is the simulator's realistic mix (agents.tools.datasets.generate,
seed 1), generated once; every run gets the same lines.

For each partition count P:

* raw ceiling: aiokafka ``getmany`` over the whole events topic (bytes only,
  one consumer; benchmarks.backfill_throughput.raw_consume);
* for each worker count W: a fresh topic prefix (``scale-<P>p<W>w-<hex>.``),
  the dataset produced keyed by user_id, a watermark marker one day after the
  last event in every partition (streams.admin.send_watermark), then W
  ``kpimon worker`` child processes (event clock, same app_id, so one consumer
  group: they share the partitions) started together.  The run ends when the
  aggregated watermark on ``kpimon.periods`` reaches the marker
  (agents.backfill.PeriodsReader).  "end to end" includes worker start-up and
  group joins; "steady" runs from the first progress message with accepted
  events to the final watermark (as in benchmarks/backfill_throughput.py).

The machine has 2 cores, shared by the broker, the workers and this process.
One worker is one Python process (one core at most); a second worker can use
the second core, minus what the broker needs, and pays a group rebalance (and
a state-log replay of the partitions that move) when both join.  With P=1 the
second worker has nothing to do.  Short runs (the 300k default) are dominated
by start-up and that rebalance; use --events 1000000 to see the scaling.

Prints a table and writes benchmarks/results/scaling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime

from benchmarks import _live


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.scaling",
        description="End-to-end throughput with 1, 2, 4 partitions x 1 vs 2 workers on the same dataset "
                    "(Apache Kafka, event clock), plus the raw aiokafka consume ceiling per partition count.",
        epilog="Full run: --events 1000000.")
    ap.add_argument("--events", type=int, default=300_000, help="events in the dataset (default 300000)")
    ap.add_argument("--users", type=int, default=100_000, help="user base of the simulated history")
    ap.add_argument("--partitions", default="1,2,4", help="comma-separated partition counts (default 1,2,4)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--timeout", type=float, default=900, help="per run, seconds")
    ap.add_argument("--out", default=str(_live.RESULTS / "scaling.json"))
    args = ap.parse_args()
    part_counts = [int(x) for x in args.partitions.split(",")]
    worker_counts = [int(x) for x in args.workers.split(",")]

    from benchmarks.backfill_throughput import START, _FirstProgress, raw_consume
    from kpimon.agents.runtime.apache_kafka import ApacheKafka
    from kpimon.agents.tools import backfill as bf
    from kpimon.agents.tools.datasets import generate
    from kpimon.config.settings import from_mapping
    from kpimon.streams import admin
    from kpimon.streams.topics import Topics

    info = _live.machine()
    t = time.perf_counter()
    lines = list(generate(args.events, start_ms=START, seed=1, users=args.users))
    gen_s = time.perf_counter() - t
    n = len(lines)
    until = bf.scan_max_ts(lines[-5000:]) + 86_400_000
    print(f"generated {n:,} events in {gen_s:.1f}s; {os.cpu_count()} cores", flush=True)

    runs = []
    raw: dict[int, float] = {}
    with ApacheKafka() as broker, tempfile.TemporaryDirectory(prefix="kpimon-bench-scaling-") as tmp:
        bootstrap = broker.bootstrap
        # Warm the broker's JVM (produce and fetch paths) so that the first run is not penalised.
        warm = Topics(f"scale-warmup-{uuid.uuid4().hex[:8]}.")
        admin.ensure_topics(bootstrap, warm, 1)
        warm_n = min(n, 100_000)
        asyncio.run(_live.produce_fast(bootstrap, warm.events, 1, lines[:warm_n]))
        asyncio.run(raw_consume(bootstrap, warm.events, 1, warm_n))
        admin.delete_topics(bootstrap, [warm.events, warm.state_log, *warm.single_partition()])
        for P in part_counts:
            for W in worker_counts:
                prefix = f"scale-{P}p{W}w-{uuid.uuid4().hex[:8]}."
                settings = from_mapping({"kafka": {"broker": f"kafka://{bootstrap}", "topic_prefix": prefix,
                                                   "partitions": P},
                                         "worker": {"clock": "event", "session_timeout": "3s"}}, "<bench>", env={})
                topics = Topics(prefix, settings.worker.app_id)
                admin.ensure_topics(bootstrap, topics, P)
                t = time.perf_counter()
                asyncio.run(_live.produce_fast(bootstrap, topics.events, P, lines))
                produce_s = time.perf_counter() - t
                admin.send_watermark(bootstrap, topics.events, P, until)
                total = n + P
                if P not in raw:
                    raw[P] = asyncio.run(raw_consume(bootstrap, topics.events, P, total))
                    print(f"P={P}: raw aiokafka getmany {n / raw[P]:,.0f} events/s", flush=True)
                workdir = os.path.join(tmp, prefix.rstrip("."))
                os.makedirs(workdir)
                cpu_b0 = _live.proc_cpu(broker.pid)
                t_start = time.perf_counter()
                workers = _live.Workers(settings.model_dump(mode="json"), W, workdir)
                first_reader = _FirstProgress(bootstrap, topics.partials)
                reader = bf.PeriodsReader(bootstrap, topics.periods)
                try:
                    first = None
                    deadline = time.monotonic() + args.timeout
                    while reader.watermark is None or reader.watermark.watermark < until:
                        workers.check()
                        if time.monotonic() > deadline:
                            raise SystemExit(f"P={P} W={W}: timed out\n{workers.log_tail()}")
                        if first is None:
                            first = first_reader.poll()
                        reader.poll(200)
                    t_end = time.perf_counter()
                    cpu = workers.cpu()
                    cpu_b = _live.proc_cpu(broker.pid)
                    health = workers.health()
                finally:
                    workers.stop()
                    reader.close()
                    first_reader.close()
                recovered = workers.count_in_logs("recovered partition ")
                accepted = reader.watermark.totals["accepted"]
                e2e = t_end - t_start
                steady = t_end - (first or t_start)
                run = {
                    "partitions": P, "workers": W, "events": n, "accepted": accepted, "produce_s": produce_s,
                    "e2e_s": e2e, "steady_s": steady, "e2e_rate": n / e2e, "steady_rate": n / steady,
                    "raw_rate": n / raw[P], "steady_to_raw": raw[P] / steady,
                    "worker_cpu_s": cpu, "broker_cpu_s": (cpu_b - cpu_b0) if None not in (cpu_b, cpu_b0) else None,
                    "partition_assignments_per_worker": recovered,
                    "final_partitions_per_worker": [len(h["partitions"]) if h else None for h in health],
                }
                runs.append(run)
                print(f"P={P} W={W}: end to end {run['e2e_rate']:,.0f}/s, steady {run['steady_rate']:,.0f}/s, "
                      f"worker CPU {', '.join('-' if c is None else f'{c:.1f}s' for c in cpu)}, "
                      f"assignments {recovered}", flush=True)
                try:
                    admin.delete_topics(bootstrap, [topics.events, topics.state_log, topics.dlq, topics.late,
                                                    topics.partials, topics.periods])
                except Exception as err:  # noqa: BLE001 - the broker goes away at the end anyway
                    print(f"(could not delete topics: {err})")

    print(f"\nscaling: {n:,} events (simulator mix, {args.users:,} users), Apache Kafka, event clock; "
          f"{info['cores']} cores, {info['python']}")
    print(f"{'P':>2} {'W':>2} {'end-to-end ev/s':>16} {'steady ev/s':>12} {'raw ev/s':>10} {'steady/raw':>10} "
          f"{'worker CPU s':>14} {'broker CPU s':>12} {'assignments':>12}")
    for r in runs:
        cpu = "+".join("-" if c is None else f"{c:.1f}" for c in r["worker_cpu_s"])
        bcpu = "-" if r["broker_cpu_s"] is None else f"{r['broker_cpu_s']:.1f}"
        print(f"{r['partitions']:>2} {r['workers']:>2} {r['e2e_rate']:>16,.0f} {r['steady_rate']:>12,.0f} "
              f"{r['raw_rate']:>10,.0f} {r['steady_to_raw']:>10.3f} {cpu:>14} {bcpu:>12} "
              f"{str(r['partition_assignments_per_worker']):>12}")
        if r["accepted"] != n:
            print(f"   note: accepted {r['accepted']:,} of {n:,}")
    print("\nnotes: 2 cores are shared by the broker (JVM), every worker and this process. One worker uses one "
          "core at most, so W=2 can gain up to the second core, minus the broker's share and the rebalance "
          "when both join (state-log replay of the partitions that move); with P=1 only one worker works. "
          "'assignments' counts 'recovered partition' log lines per worker (more than P in total means a "
          "rebalance moved partitions). Short runs are dominated by start-up; see --events 1000000. "
          "Raw = one aiokafka consumer, bytes only, no decoding.")
    _live.write_json(args.out, {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), **info, "broker": "apache",
        "events": n, "users": args.users, "generate_s": gen_s, "runs": runs,
        "note": "2-core machine shared by broker, workers and the benchmark process",
    })


if __name__ == "__main__":
    main()
