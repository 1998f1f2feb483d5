"""Backfill: a team's history through the real pipeline, end to end, into a report.

Steps: a broker (the embedded Tansu unless one is given), fresh topics under a
run-specific prefix, produce the file (bad lines too), write a watermark marker
``--until`` into every partition, run the real worker (``kpimon worker`` in a
child process, the same faust app and agents), wait until the aggregated
watermark reaches ``--until``, stop the worker and build the report from
``kpimon.periods``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import orjson
import yaml

from agents.core.metrics import PeriodMetrics
from agents.core.periods import GRAINS, Calendar
from streams import admin
from streams import topics as wire
from streams.events import Decoder, Rejected, format_money, parse_instant
from streams.topics import Topics


class BackfillError(RuntimeError):
    pass


def scan_max_ts(lines: Iterable[bytes], decimals: int = 2) -> int | None:
    """The latest ts among the events the worker would accept (bad lines skipped)."""
    dec = Decoder(decimals)
    dec.max_ts = int(time.time() * 1000)  # as the worker's max_future would, conservatively
    best = None
    for line in lines:
        try:
            ts = dec.decode(line).ts
        except Rejected:
            continue
        if best is None or ts > best:
            best = ts
    return best


def worker_settings(settings: Any, *, broker: str, prefix: str, partitions: int, web_port: int,
                    clock: str = "event") -> dict[str, Any]:
    data = settings.model_dump(mode="json")
    data["kafka"].update(broker=broker, topic_prefix=prefix, partitions=partitions)
    data["worker"].update(clock=clock, web_port=web_port, session_timeout="3s")
    data["redis"]["enabled"] = False  # a backfill writes only its report, never the serving layer
    path = settings.kpis_path()
    data["kpis"] = str(path.resolve()) if path is not None else None
    return data


def write_config(data: dict[str, Any], directory: str) -> str:
    path = os.path.join(directory, "kpimon.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    return path


def spawn_worker(config_path: str, log_path: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``kpimon worker --config PATH`` as a child process (its own process group)."""
    logf = open(log_path, "ab")
    full_env = dict(os.environ)
    for var in ("KPIMON_BROKER", "KPIMON_TOPIC_PREFIX", "KPIMON_WEB_PORT", "KPIMON_APP_ID"):
        full_env.pop(var, None)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "agents.cli", "worker", "--config", config_path],
                            stdout=logf, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def stop_worker(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class PeriodsReader:
    """Follows ``kpimon.periods``: the closed periods (latest per key) and the global watermark."""

    bootstrap: str
    topic: str
    closed: dict[str, wire.ClosedPeriod] = field(default_factory=dict)
    watermark: wire.GlobalWatermark | None = None

    def __post_init__(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                       enable_auto_commit=False)
        tp = TopicPartition(self.topic, 0)
        self._consumer.assign([tp])
        self._consumer.seek_to_beginning(tp)

    def poll(self, timeout_ms: int = 500) -> None:
        for records in self._consumer.poll(timeout_ms=timeout_ms, max_records=10000).values():
            for rec in records:
                msg = wire.decode_periods(rec.value)
                if isinstance(msg, wire.ClosedPeriod):
                    self.closed[f"{msg.grain}/{msg.period}"] = msg
                elif self.watermark is None or msg.watermark >= self.watermark.watermark:
                    self.watermark = msg

    def wait_for(self, watermark_ms: int, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
        deadline = time.monotonic() + timeout_s
        while self.watermark is None or self.watermark.watermark < watermark_ms:
            if time.monotonic() > deadline:
                got = None if self.watermark is None else self.watermark.watermark
                raise BackfillError(f"timed out waiting for the watermark to reach {watermark_ms} (at {got})")
            if not alive():
                raise BackfillError("the worker exited before the backfill finished")
            self.poll()

    def close(self) -> None:
        self._consumer.close()


def latest_snapshots(bootstrap: str, topic: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The latest version of every snapshot on ``kpimon.snapshots``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in admin.consume_all(bootstrap, topic, timeout_s=1.0):
        snap = orjson.loads(rec.value)
        key = (snap["grain"], snap["period"])
        if key not in out or snap["version"] >= out[key]["version"]:
            out[key] = snap
    return out


def build_report(closed: Iterable[wire.ClosedPeriod], watermark: wire.GlobalWatermark | None,
                 settings: Any, snapshots: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    cal = Calendar(settings.timezone)
    decimals = settings.money.decimals
    order = {str(g): i for i, g in enumerate(GRAINS)}
    periods = []
    for msg in sorted(closed, key=lambda m: (order[m.grain], m.start)):
        metrics = PeriodMetrics.from_wire(msg.metrics).result(settings.lifecycle.warning_state,
                                                                lambda v: format_money(v, decimals))
        entry = {"grain": msg.grain, "period": msg.period, "start": cal.iso(msg.start), "end": cal.iso(msg.end),
                 "metrics": metrics}
        snap = (snapshots or {}).get((msg.grain, msg.period))
        if snap is not None and (snap["kpis"] or snap["owners"]):
            entry["kpis"] = snap["kpis"]
            entry["owners"] = snap["owners"]
            entry["snapshot"] = {"version": snap["version"], "hash": snap["hash"]}
        periods.append(entry)
    totals = watermark.totals if watermark else {}
    return {
        "events": {k: totals.get(k, 0) for k in ("accepted", "rejected", "duplicates", "late")},
        "rejected_by_reason": dict(sorted((totals.get("rejected_by_reason") or {}).items())),
        "watermark": cal.iso(watermark.watermark) if watermark else None,
        "periods": periods,
    }


def run(path: str, settings: Any, *, until: str | None = None, broker: str | None = None,
        partitions: int | None = None, workdir: str | None = None, timeout_s: float = 3600,
        on_produced: Callable[[int], None] | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run a backfill and return the report (see README and docs/metrics.md)."""
    from agents.runtime.ports import free_port
    from agents.runtime.tansu import TansuBroker

    partitions = partitions or settings.kafka.partitions
    until_ms = parse_instant(until) if until else None
    if until_ms is None:
        max_ts = scan_max_ts(admin.read_lines(path), settings.money.decimals)
        if max_ts is None:
            raise BackfillError(f"{path}: no valid event to backfill")
        until_ms = max_ts - settings.lateness
    prefix = f"backfill-{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix, settings.worker.app_id)
    with ExitStack() as stack:
        tmp = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="kpimon-backfill-"))
        if broker is None:
            tansu = stack.enter_context(TansuBroker())
            bootstrap = tansu.bootstrap
            log(f"embedded broker on {bootstrap}")
        else:
            bootstrap = broker.split("://", 1)[-1]
        admin.ensure_topics(bootstrap, topics, partitions)
        n = admin.produce_lines(bootstrap, topics.events, admin.read_lines(path), on_produced)
        admin.send_watermark(bootstrap, topics.events, partitions, until_ms)
        log(f"produced {n} lines to {topics.events} ({partitions} partitions)")
        cfg = write_config(worker_settings(settings, broker=f"kafka://{bootstrap}", prefix=prefix,
                                           partitions=partitions, web_port=free_port()), tmp)
        worker = spawn_worker(cfg, os.path.join(tmp, "worker.log"))
        stack.callback(stop_worker, worker)
        reader = PeriodsReader(bootstrap, topics.periods)
        stack.callback(reader.close)
        try:
            reader.wait_for(until_ms, timeout_s, alive=lambda: worker.poll() is None)
        except BackfillError as err:
            tail = Path(tmp, "worker.log").read_text(errors="replace")[-3000:]
            raise BackfillError(f"{err}\n--- worker log tail ---\n{tail}") from None
        reader.poll(200)
        return build_report(reader.closed.values(), reader.watermark, settings,
                            latest_snapshots(bootstrap, topics.snapshots))
