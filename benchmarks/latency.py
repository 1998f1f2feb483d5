"""Live-mode latency: from producing an event to the event being reflected in ``/metrics``.

    python3 -m benchmarks.latency [--rate 50000] [--seconds 30] [--warmup 10] [--partitions 4]

Set-up: a single-node Apache Kafka (agents.runtime.apache_kafka.ApacheKafka),
fresh topics (streams.admin.ensure_topics), one ``kpimon worker`` child process
with ``worker.clock: live`` (session timeout 3 s, a free web port).

Load: an aiokafka producer in this process sends minimal valid events (a mix of
page_view, session_start, login, app_open, purchase, invite and signup over
``--users`` users, keyed by user_id) with ``ts`` = the wall clock at creation,
paced at ``--rate`` events/s in ticks of ``--tick`` seconds (one BatchBuilder
per partition per tick).  The creation time of every event is its send time.

Measurement: a separate sampler process GETs ``/metrics`` every
``--sample-interval`` (50 ms; each scrape costs the worker ~2 ms of CPU, so
sampling at 100 Hz took ~5-10 % of its core) and records (response time, sum of
``kpimon_events_total``).  The latency of event *i* (0-based, in production
order) is the time of the first sample whose counter is >= i+1 minus the send
time of event i.  The counter is cumulative and events are counted in arrival
order per poll, so this pairs "the i-th event counted" with "the i-th event
sent" -- exact per partition, approximate across partitions.  The worker bumps
that counter only after the batch's state-log record is acknowledged by the
broker: "reflected" means durable and visible.

After the run the state log is read back to split each measured event's
latency into: send -> the worker's poll that processed it (the record's wall
clock reading), processing -> state-log write issued (the record's Kafka
CreateTime), write issued -> visible in a /metrics sample.

Only events sent during the ``--seconds`` window after ``--warmup`` are
measured.  Prints a table and writes benchmarks/results/latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from array import array
from bisect import bisect_left, bisect_right
from datetime import UTC, datetime

from benchmarks import _live
from benchmarks._live import percentile

# Event templates (bytes %-formatting is the cheapest way to build them): (event index, user, ts ms).
_T = b'{"event_id":"L%d","user_id":"u%d","type":"%s","ts":%d}'
TEMPLATES = [
    _T.replace(b"%s", b"page_view"),
    _T.replace(b"%s", b"session_start"),
    _T.replace(b"%s", b"page_view"),
    _T.replace(b"%s", b"login"),
    _T.replace(b"%s", b"page_view"),
    b'{"event_id":"L%d","user_id":"u%d","type":"purchase","amount":"19.99","ts":%d}',
    _T.replace(b"%s", b"app_open"),
    _T.replace(b"%s", b"page_view"),
    _T.replace(b"%s", b"invite"),
    b'{"event_id":"L%d","user_id":"u%d","type":"signup","channel":"organic","ts":%d}',
]


# ---------------------------------------------------------------- sampler (child process)
def _sampler(port: int, interval: float, out_path: str, stop, started) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    t_req, t_resp, counts = array("d"), array("d"), array("d")
    started.set()
    next_t = time.time()
    while not stop.is_set():
        t0 = time.time()
        try:
            conn.request("GET", "/metrics")
            body = conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            time.sleep(interval)
            continue
        t1 = time.time()
        t_req.append(t0)
        t_resp.append(t1)
        counts.append(_live.events_total(body))
        next_t += interval
        delay = next_t - time.time()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.time()
    with open(out_path, "wb") as fh:
        fh.write(len(counts).to_bytes(8, "little"))
        t_req.tofile(fh)
        t_resp.tofile(fh)
        counts.tofile(fh)


def _read_samples(path: str) -> tuple[array, array, array]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        out = []
        for _ in range(3):
            a = array("d")
            a.fromfile(fh, n)
            out.append(a)
    return out[0], out[1], out[2]


# ---------------------------------------------------------------- producer
class Sent:
    def __init__(self) -> None:
        self.t = array("d")  # send (creation) time per event, wall clock seconds
        self.part = array("b")  # partition per event
        self.offset = array("q")  # offset per event (-1 until acknowledged)
        self.acks: list[float] = []  # per produced batch: ack time - send time
        self.behind_max = 0.0  # the most the paced producer fell behind its schedule (events/rate)


async def produce(bootstrap: str, topic: str, partitions: int, rate: float, t_start: float, t_end: float,
                  users: int, tick: float) -> Sent:
    producer = _live.new_producer(bootstrap)
    await producer.start()
    sent = Sent()
    keys = [b"u%d" % u for u in range(users)]
    part_of = [_live.partition_of(k, partitions) for k in keys]
    n_tpl = len(TEMPLATES)
    futures = []
    max_per_tick = max(1, int(rate * 0.05))
    i = 0
    try:
        while True:
            now = time.time()
            if now >= t_end:
                break
            due = int((now - t_start) * rate)
            sent.behind_max = max(sent.behind_max, (due - i) / rate)
            n = min(due - i, max_per_tick)
            if n > 0:
                ts = int(now * 1000)
                # before any await: an ack callback may fill in offsets of this tick's events
                sent.t.extend([now] * n)
                sent.offset.extend([-1] * n)
                builders: dict[int, object] = {}
                members: dict[int, list[int]] = {}
                for j in range(i, i + n):
                    u = (j * 7919) % users
                    p = part_of[u]
                    b = builders.get(p)
                    if b is None:
                        b = builders[p] = producer.create_batch()
                        members[p] = []
                    value = TEMPLATES[j % n_tpl] % (j, u, ts)
                    if b.append(key=keys[u], value=value, timestamp=None) is None:  # full: ship it
                        futures.append(await _ship(producer, b, topic, p, members[p], now, sent))
                        b = builders[p] = producer.create_batch()
                        members[p] = []
                        b.append(key=keys[u], value=value, timestamp=None)
                    members[p].append(j)
                    sent.part.append(p)
                i += n
                for p, b in builders.items():
                    futures.append(await _ship(producer, b, topic, p, members[p], now, sent))
                if len(futures) > 2000:
                    futures = [f for f in futures if not f.done()]
            delay = tick - (time.time() - now)
            await asyncio.sleep(delay if delay > 0 else 0)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


async def _ship(producer, batch, topic: str, p: int, members: list[int], t_send: float,
                sent: Sent):
    fut = await producer.send_batch(batch, topic, partition=p)

    def done(f) -> None:
        if f.cancelled() or f.exception() is not None:
            return
        sent.acks.append(time.time() - t_send)
        base = f.result().offset
        off = sent.offset
        for k, j in enumerate(members):
            off[j] = base + k

    fut.add_done_callback(done)
    return fut


# ---------------------------------------------------------------- state log
async def read_state_log(bootstrap: str, topic: str, partitions: int) -> dict[int, list[tuple[int, int, int, int]]]:
    """Per partition: (start, end, clock ms, CreateTime ms) of every state-log record, in order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from kpimon.agents.core.batch import decode as decode_record

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                         max_partition_fetch_bytes=32 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        out: dict[int, list] = {p: [] for p in range(partitions)}
        while True:
            got = await c.getmany(timeout_ms=500, max_records=20000)
            for tp, msgs in got.items():
                for m in msgs:
                    r = decode_record(m.value)
                    if r.end > r.start and r.clock is not None:
                        out[tp.partition].append((r.start, r.end, r.clock, m.timestamp))
            if not got:
                if all([await c.position(tp) >= ends[tp] for tp in tps]):
                    break
        return out
    finally:
        await c.stop()


# ---------------------------------------------------------------- main
def _stats(values: list[float]) -> dict:
    values.sort()
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": values[-1] if values else None,
            "mean": sum(values) / len(values) if values else None}


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python3 -m benchmarks.latency",
        description="Live-mode latency from produce to the event being reflected in /metrics (p50/p95/p99), "
                    "Apache Kafka + one kpimon worker child process.",
        epilog="Full run: --warmup 310 --seconds 120 (a warm-up longer than lateness, 5m by default, so that "
               "the live engine's reorder buffer is full when measuring). 50000 events/s is about a third to a "
               "half of the steady backfill throughput (benchmarks/results/backfill_throughput.json).")
    ap.add_argument("--rate", type=float, default=50_000,
                    help="target events/s (default 50000; meant to be ~50%% of max throughput)")
    ap.add_argument("--seconds", type=float, default=30, help="measured window (default 30)")
    ap.add_argument("--warmup", type=float, default=10, help="load before the measured window (default 10)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--users", type=int, default=100_000, help="distinct user_ids in the traffic")
    ap.add_argument("--tick", type=float, default=0.005, help="producer pacing tick in seconds (default 0.005)")
    ap.add_argument("--sample-interval", type=float, default=0.05, help="/metrics poll period (default 0.05)")
    ap.add_argument("--drain-timeout", type=float, default=120,
                    help="after producing, wait at most this long for the counter to catch up")
    ap.add_argument("--lateness", default=None,
                    help="override the lateness setting, e.g. 5s (default: the setting's default, 5m)")
    ap.add_argument("--batch-max-records", type=int, default=None,
                    help="override worker.batch_max_records (default: the setting's default, 4000)")
    ap.add_argument("--out", default=str(_live.RESULTS / "latency.json"))
    args = ap.parse_args()

    from kpimon.agents.runtime.apache_kafka import ApacheKafka
    from kpimon.agents.runtime.ports import free_port
    from kpimon.config.settings import from_mapping
    from kpimon.streams import admin
    from kpimon.streams.topics import Topics

    info = _live.machine()
    prefix = f"lat-{uuid.uuid4().hex[:8]}."
    with ApacheKafka() as broker, tempfile.TemporaryDirectory(prefix="kpimon-bench-latency-") as tmp:
        bootstrap = broker.bootstrap
        settings = from_mapping({**({"lateness": args.lateness} if args.lateness else {}),
                                 "kafka": {"broker": f"kafka://{bootstrap}", "topic_prefix": prefix,
                                           "partitions": args.partitions},
                                 "worker": {"clock": "live", "web_port": free_port(), "session_timeout": "3s",
                                            **({"batch_max_records": args.batch_max_records}
                                               if args.batch_max_records else {})}},
                                "<bench>", env={})
        batch_max = settings.worker.batch_max_records
        lateness_s = settings.lateness / 1000
        topics = Topics(prefix, settings.worker.app_id)
        admin.ensure_topics(bootstrap, topics, args.partitions)
        workers = _live.Workers(settings.model_dump(mode="json"), 1, tmp)
        try:
            ready_s = workers.wait_ready(args.partitions)
            port = workers.ports[0]
            ctx = mp.get_context("spawn")
            stop, started = ctx.Event(), ctx.Event()
            samples_path = os.path.join(tmp, "samples.bin")
            sampler = ctx.Process(target=_sampler, args=(port, args.sample_interval, samples_path, stop, started),
                                  daemon=True)
            sampler.start()
            started.wait(30)
            time.sleep(0.5)
            cpu0 = (workers.cpu()[0], _live.proc_cpu(broker.pid), os.times())
            t_start = time.time() + 0.05
            t_meas0 = t_start + args.warmup
            t_end = t_meas0 + args.seconds
            print(f"producing {args.rate:,.0f} events/s for {args.warmup:g}s warm-up + {args.seconds:g}s measured "
                  f"({args.partitions} partitions, worker ready after {ready_s:.1f}s) ...", flush=True)
            sent = asyncio.run(produce(bootstrap, topics.events, args.partitions, args.rate, t_start, t_end,
                                       args.users, args.tick))
            t_prod_done = time.time()
            cpu1 = (workers.cpu()[0], _live.proc_cpu(broker.pid), os.times())
            total = len(sent.t)
            url = f"http://127.0.0.1:{port}/metrics"
            deadline = time.monotonic() + args.drain_timeout
            while True:
                try:
                    if _live.events_total(_live.get(url)) >= total:
                        break
                except OSError:  # a worker busy with a backlog answers late: not done yet
                    pass
                workers.check()
                if time.monotonic() > deadline:
                    print(f"warning: counter did not reach {total} within {args.drain_timeout:.0f}s")
                    break
                time.sleep(0.2)
            time.sleep(0.2)
            stop.set()
            sampler.join(30)
            t_req, t_resp, counts = _read_samples(samples_path)
            log = asyncio.run(read_state_log(bootstrap, topics.state_log, args.partitions))
        finally:
            workers.stop()

    # -------------------------------------------------------------- analysis
    i0 = bisect_left(sent.t, t_meas0)
    i1 = bisect_left(sent.t, t_end)
    measured = i1 - i0
    achieved = measured / args.seconds
    counts_l = list(counts)
    lat: list[float] = []
    unresolved = 0
    first_sample_idx = array("q")
    for i in range(i0, i1):
        k = bisect_left(counts_l, i + 1)
        first_sample_idx.append(k)
        if k >= len(counts_l):
            unresolved += 1
            continue
        lat.append(t_resp[k] - sent.t[i])
    thirds = [_stats(lat[k * len(lat) // 3:(k + 1) * len(lat) // 3])["p50"] for k in range(3)]
    s_total = _stats(lat)
    # consumed rate over the measured window, from the samples
    ka = bisect_left(t_resp, t_meas0)
    kb = bisect_left(t_resp, t_end) - 1
    consumed = (counts[kb] - counts[ka]) / (t_resp[kb] - t_resp[ka]) if kb > ka else None
    scrape = sorted(b - a for a, b in zip(t_req, t_resp))
    gaps = sorted(b - a for a, b in zip(t_resp, t_resp[1:]))

    # breakdown from the state log
    to_poll, to_write, to_visible = [], [], []
    starts = {p: [r[0] for r in recs] for p, recs in log.items()}
    clocks_in_window = set()
    for n_i, i in enumerate(range(i0, i1)):
        p, off = sent.part[i], sent.offset[i]
        recs = log.get(p)
        if off < 0 or not recs:
            continue
        r = bisect_right(starts[p], off) - 1
        if r < 0 or not (recs[r][0] <= off < recs[r][1]):
            continue
        _, _, clock, created = recs[r]
        clocks_in_window.add(clock)
        to_poll.append(clock / 1000 - sent.t[i])
        to_write.append((created - clock) / 1000)
        k = first_sample_idx[n_i]
        if k < len(counts_l):
            to_visible.append(t_resp[k] - created / 1000)
    polls = len(clocks_in_window)
    # the worker's poll rate while it processed the window's events (they may have waited in Kafka)
    poll_span = (max(clocks_in_window) - min(clocks_in_window)) / 1000 if polls > 1 else None
    poll_rate = (polls - 1) / poll_span if poll_span else None
    s_poll, s_write, s_vis = _stats(to_poll), _stats(to_write), _stats(to_visible)
    s_ack = _stats(list(sent.acks))

    w_cpu = (cpu1[0] - cpu0[0]) if None not in (cpu0[0], cpu1[0]) else None
    b_cpu = (cpu1[1] - cpu0[1]) if None not in (cpu0[1], cpu1[1]) else None
    me_cpu = (cpu1[2].user + cpu1[2].system) - (cpu0[2].user + cpu0[2].system)
    wall = t_prod_done - t_start

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:9.1f}"

    print(f"\nlatency, live clock: target {args.rate:,.0f} events/s, achieved {achieved:,.0f} events/s produced "
          f"({measured:,} events in {args.seconds:g}s), worker counted "
          f"{'-' if consumed is None else f'{consumed:,.0f}'} events/s; {args.partitions} partitions, "
          f"{info['cores']} cores, {info['python']}")
    print(f"{'stage (ms)':48} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9} {'mean':>9}")
    rows = [
        ("produce -> reflected in /metrics (end to end)", s_total),
        ("  produce -> worker poll processing it", s_poll),
        ("  poll processing -> state-log write issued", s_write),
        ("  state-log write issued -> seen in /metrics", s_vis),
        ("producer batch ack (aiokafka, acks=all)", s_ack),
    ]
    for name, s in rows:
        print(f"{name:48} {ms(s['p50'])} {ms(s['p95'])} {ms(s['p99'])} {ms(s['max'])} {ms(s['mean'])}")
    print(f"\n/metrics samples: {len(t_resp):,}, scrape p50 {ms(percentile(scrape, 50)).strip()} ms, "
          f"gap p50/p99 {ms(percentile(gaps, 50)).strip()}/{ms(percentile(gaps, 99)).strip()} ms; "
          f"unresolved events: {unresolved}; producer fell behind schedule by at most {sent.behind_max:.2f}s")
    per_poll = measured / max(polls, 1)
    print(f"worker polls that processed the window's events: {polls} over {_num(poll_span, '.1f')}s "
          f"({_num(poll_rate, '.1f')}/s), {per_poll:,.0f} events per poll (worker.batch_max_records = {batch_max})")
    print("end-to-end p50 by thirds of the window: " + " / ".join(ms(v).strip() for v in thirds) + " ms")
    buffered = achieved * min(lateness_s, args.warmup + args.seconds)
    print(f"lateness {lateness_s:g}s: in live mode the engine's reorder buffer holds the last {lateness_s:g}s of "
          f"accepted events (wm = clock - lateness); at the end of the window about {buffered:,.0f} events "
          + ("(still filling: warm-up + window < lateness)" if args.warmup + args.seconds < lateness_s else
             "(full)"))
    saturated = (consumed is not None and consumed < 0.97 * achieved) or per_poll > 0.9 * batch_max
    if saturated:
        print("SATURATED: the worker took (nearly) full polls and/or counted fewer events/s than were produced; "
              "latency is mostly queueing in Kafka before the worker's poll (see 'produce -> worker poll').")
    print(f"CPU over {wall:.0f}s of load: worker {w_cpu if w_cpu is None else f'{w_cpu:.1f}s'}, "
          f"broker {b_cpu if b_cpu is None else f'{b_cpu:.1f}s'}, producer+orchestrator {me_cpu:.1f}s "
          f"(of {wall * (info['cores'] or 1):.0f} core-seconds)")
    print("note: the worker bumps kpimon_events_total only after the batch's state-log record is acknowledged "
          "by the broker, so 'reflected' = durable + visible. Latencies include the sampling period "
          f"({args.sample_interval * 1000:g} ms) and the response time of the scrape. The state log's clock has "
          "1 ms resolution; the three stages are separate distributions and do not add up percentile by "
          "percentile.")

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), **info,
        "broker": "apache", "partitions": args.partitions, "users": args.users, "lateness_s": lateness_s,
        "reorder_buffer_events_at_end": buffered,
        "target_rate": args.rate, "achieved_rate": achieved, "worker_counted_rate": consumed,
        "warmup_s": args.warmup, "seconds": args.seconds, "tick_s": args.tick,
        "sample_interval_s": args.sample_interval, "measured_events": measured, "unresolved": unresolved,
        "latency_s": s_total, "stages_s": {"produce_to_poll": s_poll, "poll_to_statelog_write": s_write,
                                           "statelog_write_to_visible": s_vis, "producer_batch_ack": s_ack},
        "polls_for_window_events": polls, "poll_rate_per_s": poll_rate, "events_per_poll": per_poll,
        "batch_max_records": batch_max, "p50_by_thirds_s": thirds, "saturated": saturated,
        "samples": len(t_resp), "scrape_s_p50": percentile(scrape, 50),
        "sample_gap_s_p99": percentile(gaps, 99), "producer_behind_max_s": sent.behind_max,
        "cpu_s": {"worker": w_cpu, "broker": b_cpu, "producer_process": me_cpu, "wall": wall},
        "note": "counter bumped after the state-log record is acknowledged",
    }
    _live.write_json(args.out, result)


if __name__ == "__main__":
    main()
