"""Backfill: a team's history through the real pipeline, end to end, into a report.

Steps: sort the file by event time (below), a broker (the embedded Tansu unless
one is given), fresh topics under a run-specific prefix, produce the sorted
lines (bad lines too), write a watermark marker ``--until`` into every
partition, run the real worker (``kpimon worker`` in a child process, the same
faust app and agents), wait until the aggregated watermark reaches ``--until``,
stop the worker and build the report from ``kpimon.periods``.

Why sort: the worker runs on the event clock, and a partition's watermark is its
newest accepted ``ts`` minus ``lateness``; an event older than that is refused
as late.  A file in any other order than time order would lose most of its
events that way.  Backfill knows the whole file, so it produces the lines in
the total order ``(ts, raw line bytes)``: each partition (keyed by ``user_id``)
then receives its events in time order, nothing is late, and the report is the
same, byte for byte, for any order of the same lines.  Ties are broken by the
raw bytes, not by the position in the file, so that when one ``event_id``
occurs twice with different content, the one the dedup keeps does not depend on
the file's order either.  Lines the decoder refuses go first, in byte order;
the worker dead-letters them (``rejected`` in the report).

The sort is an external merge sort, so files larger than memory work: the
lines are read in chunks of about ``sort_memory`` bytes (``--sort-memory``),
each chunk is sorted and spilled to a run file in the backfill's work
directory, and the runs are merged with :func:`heapq.merge` (at most
:data:`MERGE_FAN_IN` files open at once).  A file that fits in one chunk is
sorted in memory.  The ``ts`` comes from the real decoder with the worker's
settings (:func:`history_decoder`).
"""

from __future__ import annotations

import heapq
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson
import yaml

from kpimon.agents.core.grains import GRAINS
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.agents.core.periods import Calendar
from kpimon.errors import KpimonError
from kpimon.streams import admin
from kpimon.streams import topics as wire
from kpimon.streams.events import Decoder, Rejected, format_money, parse_instant
from kpimon.streams.topics import Topics


class BackfillError(KpimonError, RuntimeError):
    """The backfill cannot go on (the broker, the worker or the input failed); exit status 1."""


SORT_MEMORY = 256 * 2**20  # bytes of one in-memory chunk of the sort (``--sort-memory``)
RECORD_OVERHEAD = 150  # bytes of a record in memory besides its line (tuple, int, bytes header, list slot)
MERGE_FAN_IN = 64  # run files merged at once

# A sort record: (ts, line) for an event, (UNDECODABLE, line) for a line the decoder refuses.
# Compared as tuples, the order is total and only depends on the lines themselves.
SortRecord = tuple[int, bytes]
UNDECODABLE = -(2**63)  # before any ts the decoder accepts (it refuses anything before its minimum)
_key, _line = itemgetter(0), itemgetter(1)


def _sort_chunk(chunk: list[SortRecord]) -> None:
    """``chunk.sort()``, about twice as fast: two stable sorts on one plain key each."""
    chunk.sort(key=_line)
    chunk.sort(key=_key)


def _spill(records: Iterable[SortRecord], workdir: str) -> str:
    """Write sorted records to a new run file in ``workdir``; return its path."""
    fd, path = tempfile.mkstemp(prefix="sort-run-", suffix=".txt", dir=workdir)
    with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
        fh.writelines(b"%d %s\n" % rec for rec in records)
    return path


def _read_run(fh) -> Iterator[SortRecord]:
    for rec in fh:
        key, line = rec.split(b" ", 1)
        yield int(key), line[:-1]


def _merge_runs(paths: list[str], tail: list[SortRecord]) -> Iterator[SortRecord]:
    with ExitStack() as stack:
        files = [stack.enter_context(open(p, "rb", buffering=1 << 16)) for p in paths]
        yield from heapq.merge(*map(_read_run, files), tail)


def external_sort(records: Iterable[SortRecord], workdir: str, memory: int = SORT_MEMORY,
                  fan_in: int = MERGE_FAN_IN, stats: dict[str, int] | None = None) -> Generator[SortRecord, None, None]:
    """``sorted(records)`` in bounded memory.

    Chunks of about ``memory`` bytes are sorted and spilled to run files in
    ``workdir``; the runs (and the last chunk, kept in memory) are merged with
    :func:`heapq.merge`.  More than ``fan_in`` runs are first merged into
    longer runs, so that at most ``fan_in`` files are open at once.  Input
    that fits in one chunk never touches the disk.  The run files are removed
    when the iterator is exhausted or closed.  Lines must not contain a newline.
    ``stats["runs"]``, if given, receives the number of chunks spilled.
    """
    if memory < 1 or fan_in < 2:
        raise ValueError("memory must be positive and fan_in at least 2")
    runs: list[str] = []
    try:
        chunk: list[SortRecord] = []
        size = 0
        for rec in records:
            line = rec[1]
            if b"\n" in line:
                raise ValueError("a line to sort contains a newline")
            chunk.append(rec)
            size += len(line) + RECORD_OVERHEAD
            if size >= memory:
                _sort_chunk(chunk)
                runs.append(_spill(chunk, workdir))
                chunk = []
                size = 0
        if stats is not None:
            stats["runs"] = len(runs)
        _sort_chunk(chunk)
        while len(runs) > fan_in:
            group, runs = runs[:fan_in], runs[fan_in:]
            runs.append(_spill(_merge_runs(group, []), workdir))
            for path in group:
                os.remove(path)
        yield from _merge_runs(runs, chunk) if runs else chunk
    finally:
        for path in runs:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def history_decoder(settings: Any) -> Decoder:
    """A decoder with the worker's settings (``money.decimals``; ``min_epoch_ms`` where configured)."""
    kwargs = {}
    if getattr(settings, "min_epoch_ms", None) is not None:
        kwargs["min_epoch_ms"] = settings.min_epoch_ms
    return Decoder(settings.money.decimals, **kwargs)


@dataclass
class SortedHistory:
    """A history file in backfill order (see the module docstring); iterate once for the lines."""

    first: SortRecord | None
    rest: Generator[SortRecord, None, None]  # the merge, started (closing it removes the run files)
    count: int  # lines (bad ones included)
    bad: int  # lines the decoder refuses; they come first
    max_ts: int | None  # the latest ts not after the wall clock, as scan_max_ts
    runs: int  # run files spilled (0: sorted in memory)

    def __iter__(self) -> Iterator[bytes]:
        if self.first is None:
            return
        yield self.first[1]
        for rec in self.rest:
            yield rec[1]

    def close(self) -> None:
        """Remove the run files now (also done once the lines are exhausted)."""
        self.rest.close()


def sort_history(lines: Iterable[bytes], decoder: Decoder, workdir: str, memory: int = SORT_MEMORY,
                 fan_in: int = MERGE_FAN_IN) -> SortedHistory:
    """Read every line now (the first pass of the sort); the merged lines follow lazily."""
    now = int(time.time() * 1000)
    decode = decoder.decode
    stats: dict[str, Any] = {"count": 0, "bad": 0, "max_ts": None, "runs": 0}

    def records() -> Iterator[SortRecord]:
        count = bad = 0
        best = None
        for line in lines:
            count += 1
            try:
                ts = decode(line).ts
            except Rejected:
                bad += 1
                yield UNDECODABLE, line
                continue
            if ts <= now and (best is None or ts > best):
                best = ts
            yield ts, line
        stats.update(count=count, bad=bad, max_ts=best)

    merged = external_sort(records(), workdir, memory, fan_in, stats)
    first = next(merged, None)  # a sort yields nothing before it has read all input
    return SortedHistory(first, merged, stats["count"], stats["bad"], stats["max_ts"], stats["runs"])


def scan_max_ts(lines: Iterable[bytes], decimals: int = 2, min_epoch_ms: int | None = None) -> int | None:
    """The latest ts among the events the worker would accept (bad lines skipped)."""
    dec = Decoder(decimals) if min_epoch_ms is None else Decoder(decimals, min_epoch_ms=min_epoch_ms)
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
                    state_dir: str, clock: str = "event") -> dict[str, Any]:
    """The child worker's settings; ``state_dir`` (its dedup stores) belongs to this run only."""
    data = settings.model_dump(mode="json")
    data["kafka"].update(broker=broker, topic_prefix=prefix, partitions=partitions)
    data["worker"].update(clock=clock, web_port=web_port, session_timeout="3s", state_dir=state_dir)
    data["redis"]["enabled"] = False  # a backfill writes only its report, never the serving layer
    path = settings.kpis_path()
    data["kpis"] = str(path.resolve()) if path is not None else None
    return data


def write_config(data: dict[str, Any], directory: str) -> str:
    path = os.path.join(directory, "kpimon.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    return path


def kpimon_command(*args: str) -> list[str]:
    """The command line that runs ``kpimon ARGS`` in a child process, with this interpreter.

    ``-P`` keeps the child's working directory off its ``sys.path``, so a
    user's own ``kpimon.py`` or ``kpimon/`` there cannot shadow the installed
    package (``python -m`` would put it first).
    """
    return [sys.executable, "-P", "-m", "kpimon", *args]


def spawn_worker(config_path: str, log_path: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``kpimon worker --config PATH`` as a child process (its own process group)."""
    logf = open(log_path, "ab")
    full_env = dict(os.environ)
    for var in ("KPIMON_BROKER", "KPIMON_TOPIC_PREFIX", "KPIMON_WEB_PORT", "KPIMON_APP_ID", "KPIMON_STATE_DIR",
                "KPIMON_INSTANCE_ID"):
        full_env.pop(var, None)
    full_env.update(env or {})
    return subprocess.Popen(kpimon_command("worker", "--config", config_path), stdout=logf, stderr=subprocess.STDOUT,
                            env=full_env, start_new_session=True)


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
        sort_memory: int = SORT_MEMORY, on_produced: Callable[[int], None] | None = None,
        log: Callable[[str], None] = lambda s: None) -> dict:
    """Run a backfill and return the report (see README and docs/metrics.md).

    The lines are produced in ``(ts, line)`` order whatever their order in the
    file (see the module docstring); ``sort_memory`` bounds the sort's memory.
    """
    from kpimon.agents.runtime.ports import free_port
    from kpimon.agents.runtime.tansu import TansuBroker

    partitions = partitions or settings.kafka.partitions
    until_ms = parse_instant(until) if until else None
    prefix = f"backfill-{uuid.uuid4().hex[:8]}."
    topics = Topics(prefix, settings.worker.app_id)
    with ExitStack() as stack:
        tmp = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="kpimon-backfill-"))
        started = time.monotonic()
        history = sort_history(admin.read_lines(path), history_decoder(settings), tmp, sort_memory)
        stack.callback(history.close)  # removes the run files if the backfill stops early
        log(f"sorted {history.count} lines by event time in {time.monotonic() - started:.1f} s "
            f"({history.bad} undecodable first; {history.runs} runs spilled to disk)")
        if until_ms is None:
            if history.max_ts is None:
                raise BackfillError(f"{path}: no valid event to backfill")
            until_ms = history.max_ts - settings.lateness
        if broker is None:
            tansu = stack.enter_context(TansuBroker())
            bootstrap = tansu.bootstrap
            log(f"embedded broker on {bootstrap}")
        else:
            bootstrap = broker.split("://", 1)[-1]
        admin.ensure_topics(bootstrap, topics, partitions)
        n = admin.produce_lines(bootstrap, topics.events, iter(history), on_produced)
        admin.send_watermark(bootstrap, topics.events, partitions, until_ms)
        log(f"produced {n} lines to {topics.events} ({partitions} partitions)")
        cfg = write_config(worker_settings(settings, broker=f"kafka://{bootstrap}", prefix=prefix,
                                           partitions=partitions, web_port=free_port(),
                                           state_dir=os.path.join(tmp, "state")), tmp)
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
