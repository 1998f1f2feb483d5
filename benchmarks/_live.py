"""Shared helpers of the live benchmarks (latency, scaling, memory soak).

Not a benchmark itself: worker child processes (``kpimon worker`` through
agents.backfill.spawn_worker), readiness via ``/healthz``, a fast keyed aiokafka
producer (one BatchBuilder per partition, keys hashed like Kafka's default
partitioner), /proc readings (CPU, RSS) and small statistics.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from kpimon.agents.runtime.ports import free_port
from kpimon.agents.tools import backfill as bf

RESULTS = Path(__file__).parent / "results"
_EVENTS_TOTAL = re.compile(rb"^kpimon_events_total\{[^}]*\} (\S+)$", re.M)
_LIFECYCLE = re.compile(rb"^kpimon_lifecycle_users\{[^}]*\} (\S+)$", re.M)


# ------------------------------------------------------------------ workers
class Workers:
    """``n`` ``kpimon worker`` child processes of one deployment (same app_id, own web ports).

    ``redis.enabled`` is forced to false where the setting exists: no Redis runs in these benchmarks.
    """

    def __init__(self, data: dict[str, Any], n: int, workdir: str) -> None:
        self.procs = []
        self.ports = []
        self.logs = []
        self.state_dirs: list[str] = []  # each worker's worker.state_dir (its dedup stores)
        for i in range(n):
            cfg = json.loads(json.dumps(data))
            port = free_port()
            cfg["worker"]["web_port"] = port
            redis = cfg.get("redis")
            if isinstance(redis, dict) and "enabled" in redis:
                redis["enabled"] = False  # no Redis here: the serving layer is not what these benchmarks measure
            d = os.path.join(workdir, f"w{i}")
            os.makedirs(d, exist_ok=True)
            cfg["worker"]["state_dir"] = os.path.join(d, "state")  # each worker its own dedup stores
            self.state_dirs.append(cfg["worker"]["state_dir"])
            path = bf.write_config(cfg, d)
            log = os.path.join(d, "worker.log")
            self.procs.append(bf.spawn_worker(path, log))
            self.ports.append(port)
            self.logs.append(log)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def check(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                raise SystemExit(f"worker {i} exited with status {p.returncode}\n{self.log_tail()}")

    def health(self) -> list[dict | None]:
        out = []
        for port in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                    out.append(orjson.loads(resp.read()))
            except (OSError, ValueError):
                out.append(None)
        return out

    def wait_ready(self, partitions: int, timeout: float = 120) -> float:
        """Block until the workers own all ``partitions`` between them; returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            self.check()
            hs = self.health()
            if all(h is not None for h in hs) and sum(len(h.get("partitions", ())) for h in hs) >= partitions:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"workers not ready within {timeout:.0f}s: {hs}\n{self.log_tail()}")
            time.sleep(0.2)

    def cpu(self) -> list[float | None]:
        return [proc_cpu(p.pid) for p in self.procs]

    def log_tail(self, chars: int = 3000) -> str:
        out = []
        for i, log in enumerate(self.logs):
            try:
                out.append(f"--- worker {i} ---\n" + Path(log).read_text(errors="replace")[-chars:])
            except OSError:
                pass
        return "\n".join(out)

    def count_in_logs(self, needle: str) -> list[int]:
        out = []
        for log in self.logs:
            try:
                out.append(Path(log).read_text(errors="replace").count(needle))
            except OSError:
                out.append(0)
        return out

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM all workers at once, then wait (SIGKILL to the process group after ``timeout``)."""
        import signal
        import subprocess

        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# ------------------------------------------------------------------ /proc
def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def vm_rss(pid: int | str = "self") -> int | None:
    """VmRSS of a process in bytes (from /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def statm_rss() -> int:
    """Resident bytes of this process (/proc/self/statm, field 2)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ /metrics
def events_total(text: bytes) -> float:
    """Sum of ``kpimon_events_total`` over its ``type`` label (accepted events)."""
    return sum(float(v) for v in _EVENTS_TOTAL.findall(text))


def lifecycle_users(text: bytes) -> float:
    return sum(float(v) for v in _LIFECYCLE.findall(text))


def get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


# ------------------------------------------------------------------ producing
def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as in aiokafka and kafka-python) picks."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def new_producer(bootstrap: str):
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, enable_idempotence=False,
                            max_batch_size=512 * 1024, max_request_size=16 * 1024 * 1024)


async def produce_fast(bootstrap: str, topic: str, partitions: int, lines: Iterable[bytes]) -> int:
    """Produce JSON lines keyed by user_id (like streams.admin.produce_lines), with aiokafka batches."""
    from kpimon.streams.admin import user_key

    producer = new_producer(bootstrap)
    await producer.start()
    try:
        batches = [producer.create_batch() for _ in range(partitions)]
        futures = []
        cache: dict[bytes, int] = {}
        n = 0
        for line in lines:
            key = user_key(line)
            if key is None:
                p = n % partitions
            else:
                p = cache.get(key)
                if p is None:
                    p = cache[key] = partition_of(key, partitions)
            if batches[p].append(key=key, value=line, timestamp=None) is None:
                futures.append(await producer.send_batch(batches[p], topic, partition=p))
                batches[p] = producer.create_batch()
                batches[p].append(key=key, value=line, timestamp=None)
            n += 1
            if len(futures) > 64:
                await futures.pop(0)
        for p, b in enumerate(batches):
            if b.record_count():
                futures.append(await producer.send_batch(b, topic, partition=p))
        for f in futures:
            await f
        return n
    finally:
        await producer.stop()


# ------------------------------------------------------------------ statistics
def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def machine() -> dict[str, Any]:
    import platform

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cores": os.cpu_count(), "python": f"{platform.python_implementation()} {platform.python_version()}",
            "loadavg_at_start": load, **git_state()}


def git_state() -> dict[str, Any]:
    """The commit the product code was at, and whether agents/ had uncommitted edits (others edit it)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "agents", "config", "streams"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_head": head, "product_code_dirty": bool(dirty)}
