"""Restart time after a SIGKILL, for histories of different lengths over the same user base.

    python3 -m benchmarks.restart [--events 1000000,20000000] [--users 100000] [--fold-users N] [--partitions 4]
                                  [--checkpoint-interval 10s] [--no-checkpoints] [--restarts 3]
                                  [--reference-max 2000000]

For each history size, on one Apache Kafka broker, with a fresh deployment (own topic prefix, own
``worker.state_dir``):

1. generate the simulator's history (agents.tools.datasets.generate: the same ``--users`` for every
   size, event time spanning about six months, so checkpoints land and the state log is truncated)
   and produce it (with ``--fold-users N``, user ids taken modulo N: the simulator keeps signing
   users up, so unfolded a longer history tracks more users), then a watermark marker W1 one day after its last event;
2. run ONE ``kpimon worker`` (event clock) until ``kpimon.periods`` reaches W1.  Then a *settle*
   marker (W1 + 1 ms) one checkpoint interval later: its record makes a checkpoint due, as live
   traffic would, so the tail after the newest checkpoint is what a live deployment has, not the
   backfill's last interval;
3. read the state log's written (end offsets) and kept (end - start offsets) records and the newest
   checkpoint's bytes, SIGKILL the worker, produce a small extra batch (``--extra`` events of known
   users just after the last marker) and a marker two days later, and restart the worker; once it
   has processed them, again (``--restarts`` times, default 3).  Timed from each restart (Popen):
   "assigned" = the worker log's first partition assignment; "recovered" = its ``recovered N
   partitions`` log line appears; "first batch" = the state log's end offsets grow past where they
   were at the kill.  Each phase is reported as the median over the restarts;
4. check the report: every period closed before the first kill is republished unchanged, no period
   key is ever published with two different values, accepted = before + the extra events; and, for
   sizes up to ``--reference-max``, the final report equals that of an uninterrupted worker on a
   second deployment given the same input (history, W1, settle marker, the extra events and markers).

Prints one row per size and the ratio of the largest to the smallest size; writes
benchmarks/results/restart.json.  No assertion on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks import _live
from kpimon.agents.runtime.ports import free_port
from kpimon.agents.tools import backfill as bf
from kpimon.agents.tools.datasets import DEFAULT_START_MS, generate
from kpimon.agents.worker import checkpoints as ckpt
from kpimon.config.settings import from_mapping
from kpimon.streams import admin
from kpimon.streams.topics import Topics

DAY_MS = 86_400_000
_RECOVERED = re.compile(rb"recovered (\d+) partitions in ([0-9.]+)s")
_RECOVERED_P = re.compile(rb"recovered partition (\d+): (\d+) records applied, (\d+) skipped")
_CHECKPOINT = b"checkpoint of partition "
_JOINED = re.compile(rb"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] \[\d+\] \[INFO\] Setting newly assigned partitions",
                     re.M)


def assigned_at(log: bytes) -> float | None:
    """The epoch time of the worker's first partition assignment (its log's local-time stamp)."""
    m = _JOINED.search(log)
    if m is None:
        return None
    return datetime.strptime(m.group(1).decode(), "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()


class Deployment:
    """One deployment: its settings, topics, and one worker child process at a time."""

    def __init__(self, bootstrap: str, workdir: str, partitions: int, worker: dict[str, Any]) -> None:
        self.bootstrap = bootstrap
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.prefix = f"restart-{uuid.uuid4().hex[:8]}."
        self.partitions = partitions
        self.settings = from_mapping({"kafka": {"broker": f"kafka://{bootstrap}", "topic_prefix": self.prefix,
                                                "partitions": partitions},
                                      "worker": {"clock": "event", **worker},
                                      "redis": {"enabled": False}}, "<bench>", env={})
        self.topics = Topics(self.prefix, self.settings.worker.app_id)
        admin.ensure_topics(bootstrap, self.topics, partitions)
        self.proc = None
        self.log = ""
        self.runs = 0

    def spawn(self) -> None:
        data = self.settings.model_dump(mode="json")
        data["worker"]["web_port"] = free_port()
        data["worker"]["state_dir"] = os.path.join(self.dir, "state")  # this deployment's dedup stores
        cfg = bf.write_config(data, self.dir)
        self.runs += 1
        self.log = os.path.join(self.dir, f"worker{self.runs}.log")
        self.proc = bf.spawn_worker(cfg, self.log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise SystemExit(f"worker exited ({self.proc and self.proc.returncode})\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            bf.stop_worker(self.proc)


# ------------------------------------------------------------------ kafka readings
class Offsets:
    """Start and end offsets of a topic's partitions (kafka-python)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self._c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._tps = [TopicPartition(topic, p) for p in range(partitions)]

    def end(self) -> int:
        return sum(self._c.end_offsets(self._tps).values())

    def start(self) -> int:
        return sum(self._c.beginning_offsets(self._tps).values())

    def close(self) -> None:
        self._c.close()


def checkpoint_bytes(bootstrap: str, topic: str, partitions: int) -> tuple[int, int]:
    """(bytes of the newest checkpoint of every partition, summed; commits still in the topic)."""
    async def go() -> tuple[int, int]:
        size = kept = 0
        for found in (await ckpt.read(bootstrap, topic, list(range(partitions)))).values():
            kept += len(found.commits)
            if found.commits:
                size += found.commits[-1].size
        return size, kept

    return asyncio.run(go())


def periods_consistent(bootstrap: str, topic: str) -> tuple[int, int]:
    """(period keys published, keys published with two different values) over the whole periods topic."""
    from kpimon.streams import topics as wire

    seen: dict[str, bytes] = {}
    differing = set()
    for rec in admin.consume_all(bootstrap, topic, timeout_s=1.0):
        msg = wire.decode_periods(rec.value)
        if isinstance(msg, wire.ClosedPeriod):
            key = f"{msg.grain}/{msg.period}"
            value = orjson.dumps(msg.metrics, option=orjson.OPT_SORT_KEYS)
            if seen.setdefault(key, value) != value:
                differing.add(key)
    return len(seen), len(differing)


# ------------------------------------------------------------------ input
def extra_events(n: int, users: int, after_ms: int, tag: str = "") -> list[bytes]:
    """``n`` events of known users (the simulator's ``u%07d`` ids) within the hour after ``after_ms``."""
    kinds = ("page_view", "login", "app_open", "session_start")
    return [orjson.dumps({"event_id": f"restart-extra-{tag}{i}", "user_id": f"u{(i * 7919) % users:07d}",
                          "type": kinds[i % len(kinds)], "ts": after_ms + 1 + i * 3_600_000 // max(1, n)})
            for i in range(n)]


def fold_users(lines: Iterable[bytes], users: int) -> Iterator[bytes]:
    """The lines with every simulator id ``u%07d`` (``user_id``, ``referrer_id``) taken modulo ``users``.

    The simulator keeps signing users up, so a longer history of the same ``--users`` tracks more of them;
    folded onto fewer ids than the shortest history has, every history tracks the same ``users`` ids (a later
    signup of a folded id is activity).
    """
    loads, dumps = orjson.loads, orjson.dumps
    for line in lines:
        ev = loads(line)
        for key in ("user_id", "referrer_id"):
            uid = ev.get(key)
            if isinstance(uid, str) and uid[:1] == "u" and uid[1:].isdigit():
                ev[key] = f"u{int(uid[1:]) % users:07d}"
        yield dumps(ev)


def produce_history(dep: Deployment, n: int, users: int, keep: bool,
                    fold: int = 0) -> tuple[int, int, list[bytes] | None, float]:
    """Generate and produce the history; (lines, W1, the lines if ``keep``, seconds)."""
    tail: collections.deque[bytes] = collections.deque(maxlen=5000)
    kept: list[bytes] | None = [] if keep else None

    def lines():
        source = generate(n, start_ms=DEFAULT_START_MS, seed=1, users=users)
        for line in fold_users(source, fold) if fold else source:
            tail.append(line)
            if kept is not None:
                kept.append(line)
            yield line

    t = time.perf_counter()
    count = asyncio.run(_live.produce_fast(dep.bootstrap, dep.topics.events, dep.partitions, lines()))
    max_ts = bf.scan_max_ts(tail)
    assert max_ts is not None
    return count, max_ts + DAY_MS, kept, time.perf_counter() - t


def wait_watermark(dep: Deployment, reader: bf.PeriodsReader, until: int, timeout_s: float = 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while reader.watermark is None or reader.watermark.watermark < until:
        dep.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"watermark {until} not reached in {timeout_s:.0f}s\n{dep.log_text()[-3000:]}")
        reader.poll(200)


def wait_checkpoints(dep: Deployment, before: int, timeout_s: float) -> bool:
    """Wait for ``partitions`` more checkpoint lines in the worker log than ``before``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dep.check()
        if dep.log_text().encode().count(_CHECKPOINT) >= before + dep.partitions:
            return True
        time.sleep(0.2)
    return False


def report_of(dep: Deployment, reader: bf.PeriodsReader) -> dict[str, Any]:
    return bf.build_report(reader.closed.values(), reader.watermark, dep.settings)


# ------------------------------------------------------------------ one size
def run_size(bootstrap: str, tmp: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    worker = {"checkpoints": not args.no_checkpoints, "checkpoint_interval": args.checkpoint_interval,
              "session_timeout": args.session_timeout}
    dep = Deployment(bootstrap, os.path.join(tmp, f"d{n}"), args.partitions, worker)
    interval_s = dep.settings.worker.checkpoint_interval / 1000
    use_reference = n <= args.reference_max
    count, w1, lines, produce_s = produce_history(dep, n, args.users, keep=use_reference, fold=args.fold_users)
    print(f"[{n:,}] generated and produced {count:,} lines in {produce_s:.0f}s", flush=True)
    admin.send_watermark(bootstrap, dep.topics.events, dep.partitions, w1)

    reader = bf.PeriodsReader(bootstrap, dep.topics.periods)
    state_log = Offsets(bootstrap, dep.topics.state_log, dep.partitions)
    try:
        t = time.perf_counter()
        dep.spawn()
        wait_watermark(dep, reader, w1)
        process_s = time.perf_counter() - t
        print(f"[{n:,}] processed in {process_s:.0f}s ({count / process_s:,.0f} events/s)", flush=True)
        # Settle: one interval later, a marker's record makes a checkpoint due (as live traffic would).
        settled = None
        if not args.no_checkpoints:
            time.sleep(interval_s + 1)
            before = dep.log_text().encode().count(_CHECKPOINT)
            admin.send_watermark(bootstrap, dep.topics.events, dep.partitions, w1 + 1)
            settled = wait_checkpoints(dep, before, timeout_s=interval_s * 3 + 30)
        else:
            admin.send_watermark(bootstrap, dep.topics.events, dep.partitions, w1 + 1)
        time.sleep(2)
        reader.poll(200)
        pre = report_of(dep, reader)
        checkpoints_written = dep.log_text().encode().count(_CHECKPOINT)
        written, start = state_log.end(), state_log.start()
        cp_bytes, cp_kept = checkpoint_bytes(bootstrap, dep.topics.checkpoints, dep.partitions)

        extras: list[list[bytes]] = []
        marks: list[int] = []
        timings: list[dict[str, Any]] = []
        mark = w1
        for k in range(args.restarts):
            extra = extra_events(args.extra, args.fold_users or args.users, mark + 1, tag=f"{k}-")
            mark += 2 * DAY_MS
            extras.append(extra)
            marks.append(mark)
            timings.append(restart_once(dep, state_log, extra, mark))
            wait_watermark(dep, reader, mark)
        reader.poll(500)
        final = report_of(dep, reader)
    finally:
        dep.stop()
        state_log.close()
        reader.close()

    # Report checks.
    final_periods = {(p["grain"], p["period"]): p for p in final["periods"]}
    changed = [p for p in pre["periods"] if final_periods.get((p["grain"], p["period"])) != p]
    keys, differing = periods_consistent(bootstrap, dep.topics.periods)
    accepted_ok = final["events"]["accepted"] == pre["events"]["accepted"] + sum(map(len, extras))
    checks = {"pre_kill_periods": len(pre["periods"]), "final_periods": len(final["periods"]),
              "pre_kill_periods_changed": len(changed), "period_keys_with_two_values": differing,
              "accepted_before": pre["events"]["accepted"], "accepted_after": final["events"]["accepted"],
              "accepted_is_before_plus_extra": accepted_ok}
    if use_reference:
        assert lines is not None
        checks["reference_equal"] = reference_report(bootstrap, tmp, n, args, lines, w1, extras, marks) == final
        lines.clear()
    ok = (not changed and not differing and accepted_ok and checks.get("reference_equal", True))
    row = {"events": count, "users": args.users, "users_folded": args.fold_users, "partitions": args.partitions,
           "checkpoints": not args.no_checkpoints, "checkpoint_interval_s": interval_s,
           "produce_s": produce_s, "process_s": process_s, "settled": settled,
           "state_log_written": written, "state_log_kept": written - start,
           "checkpoints_written": checkpoints_written, "checkpoint_commits_kept": cp_kept,
           "checkpoint_bytes": cp_bytes,
           # each phase: the median over the restarts (every restart's figures under "restarts")
           **{key: _median([t[key] for t in timings]) for key in PHASES},
           "restarts": timings, "report_checks": checks, "report_ok": ok}
    print(f"[{n:,}] {row}", flush=True)
    return row


def restart_once(dep: Deployment, state_log: Offsets, extra: list[bytes], mark: int) -> dict[str, Any]:
    """SIGKILL the worker, produce ``extra`` and a watermark marker ``mark`` while it is down, restart it;
    the restart's timings."""
    dep.kill()
    at_kill = state_log.end()
    asyncio.run(_live.produce_fast(dep.bootstrap, dep.topics.events, dep.partitions, extra))
    admin.send_watermark(dep.bootstrap, dep.topics.events, dep.partitions, mark)

    t0, wall0 = time.perf_counter(), time.time()
    dep.spawn()
    recovered_s = first_s = None
    in_process_s = None
    while recovered_s is None or first_s is None:
        dep.check()
        now = time.perf_counter() - t0
        if recovered_s is None:
            m = _RECOVERED.search(dep.log_text().encode())
            if m:
                recovered_s, in_process_s = now, float(m.group(2))
        if first_s is None and state_log.end() > at_kill:
            first_s = now
        if now > 1800:
            raise SystemExit(f"no recovery within 1800s\n{dep.log_text()[-3000:]}")
        time.sleep(0.02)
    restart_log = dep.log_text().encode()
    joined = assigned_at(restart_log)
    return {"restart_to_assigned_s": None if joined is None else joined - wall0,
            "restart_to_recovered_s": recovered_s, "recover_in_process_s": in_process_s,
            "restart_to_first_batch_s": first_s,
            "tail_records_replayed": sum(int(m.group(2)) for m in _RECOVERED_P.finditer(restart_log))}


def _median(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


PHASES = ("tail_records_replayed", "restart_to_assigned_s", "restart_to_recovered_s", "recover_in_process_s",
          "restart_to_first_batch_s")


def reference_report(bootstrap: str, tmp: str, n: int, args: argparse.Namespace, lines: list[bytes], w1: int,
                     extras: list[list[bytes]], marks: list[int]) -> dict[str, Any]:
    """The report of an uninterrupted worker given the same input on a second deployment."""
    worker = {"checkpoints": not args.no_checkpoints, "checkpoint_interval": args.checkpoint_interval,
              "session_timeout": args.session_timeout}
    ref = Deployment(bootstrap, os.path.join(tmp, f"ref{n}"), args.partitions, worker)
    asyncio.run(_live.produce_fast(bootstrap, ref.topics.events, ref.partitions, lines))
    admin.send_watermark(bootstrap, ref.topics.events, ref.partitions, w1)
    admin.send_watermark(bootstrap, ref.topics.events, ref.partitions, w1 + 1)
    for extra, mark in zip(extras, marks, strict=True):
        asyncio.run(_live.produce_fast(bootstrap, ref.topics.events, ref.partitions, extra))
        admin.send_watermark(bootstrap, ref.topics.events, ref.partitions, mark)
    reader = bf.PeriodsReader(bootstrap, ref.topics.periods)
    try:
        ref.spawn()
        wait_watermark(ref, reader, marks[-1])
        reader.poll(500)
        return report_of(ref, reader)
    finally:
        ref.stop()
        reader.close()


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", default="1000000,20000000", help="history sizes, comma-separated")
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--checkpoint-interval", default="10s",
                    help="worker.checkpoint_interval (default 10s, so that several land during the run; "
                         "the product default is 1m)")
    ap.add_argument("--session-timeout", default="10s",
                    help="worker.session_timeout (default 10s, the product default): the restarted worker's "
                         "group join waits for the killed member's session to expire")
    ap.add_argument("--fold-users", type=int, default=0, metavar="N",
                    help="take the simulator's user ids modulo N, so that every size tracks the same N users "
                         "(unfolded, a longer history signs more users up: 1M events of --users 100000 have "
                         "33,383 users); 0: off")
    ap.add_argument("--no-checkpoints", action="store_true", help="worker.checkpoints: false (full replay)")
    ap.add_argument("--extra", type=int, default=2000, help="events produced while the worker is down")
    ap.add_argument("--restarts", type=int, default=3,
                    help="SIGKILL and restart this many times per size; each phase is reported as the median "
                         "(a single restart's process start-up and group join vary by ~0.3 s on a shared machine)")
    ap.add_argument("--reference-max", type=int, default=2_000_000,
                    help="compare with an uninterrupted worker's report up to this size")
    ap.add_argument("--out", default=str(_live.RESULTS / "restart.json"))
    args = ap.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.events.split(",") if s.strip()]

    from kpimon.agents.runtime.apache_kafka import ApacheKafka

    info = _live.machine()
    print(f"restart benchmark: sizes {sizes}, {args.users:,} users, {args.partitions} partitions, "
          f"users folded={args.fold_users}, "
          f"checkpoints={'off' if args.no_checkpoints else 'on'}, checkpoint_interval={args.checkpoint_interval}, "
          "checkpoint_records=5000 (default), dedup_horizon=7d, lateness=5m (defaults), "
          f"session_timeout={args.session_timeout}, clock=event, {os.cpu_count()} cores; {info}", flush=True)
    rows = []
    with ApacheKafka() as broker, tempfile.TemporaryDirectory(prefix="kpimon-restart-") as tmp:
        if os.environ.get("KPIMON_BENCH_KEEP"):
            tmp = tempfile.mkdtemp(prefix="kpimon-restart-kept-")  # logs kept for a look afterwards
        for n in sizes:
            rows.append(run_size(broker.bootstrap, tmp, n, args))

    print(f"\n{'events':>11} {'users':>8} {'state log written':>18} {'kept':>9} {'checkpoint B':>13} "
          f"{'tail rec':>9} {'->assigned s':>13} {'->recovered s':>14} {'(in worker)':>12} {'->first batch s':>16} "
          f"{'report':>7}")
    for r in rows:
        print(f"{r['events']:11,} {r['users']:8,} {r['state_log_written']:18,} {r['state_log_kept']:9,} "
              f"{r['checkpoint_bytes']:13,} {r['tail_records_replayed']:9,} "
              f"{r['restart_to_assigned_s'] or float('nan'):13.2f} {r['restart_to_recovered_s']:14.2f} "
              f"{r['recover_in_process_s']:12.2f} {r['restart_to_first_batch_s']:16.2f} "
              f"{'same' if r['report_ok'] else 'DIFF':>7}")
        print(f"{'':11} first batch after each restart: "
              + ", ".join(f"{t['restart_to_first_batch_s']:.2f} s" for t in r["restarts"]))
    ratios = {}
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        for k in ("restart_to_assigned_s", "restart_to_recovered_s", "recover_in_process_s",
                  "restart_to_first_batch_s"):
            ratios[k] = hi[k] / lo[k] if lo[k] else None
        print(f"\nratio {hi['events']:,} / {lo['events']:,} events: " +
              ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if v is not None))
    _live.write_json(args.out, {"date": datetime.now(UTC).isoformat(timespec="seconds"), **info,
                                "args": vars(args), "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
