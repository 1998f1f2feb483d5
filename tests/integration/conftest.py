"""A real pipeline on a real broker: topics, a `kpimon worker` child process, the report."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from kpimon.agents.runtime.ports import free_port
from kpimon.agents.tools import backfill as bf
from kpimon.config.settings import Settings, from_mapping
from kpimon.streams import admin
from kpimon.streams.topics import Topics


class Pipeline:
    """One isolated deployment (own topic prefix and groups) on a running broker."""

    def __init__(self, bootstrap: str, workdir: str, partitions: int = 4, **overrides: Any) -> None:
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.prefix = f"t{uuid.uuid4().hex[:8]}."
        data: dict[str, Any] = {
            "kafka": {"broker": f"kafka://{bootstrap}", "topic_prefix": self.prefix, "partitions": partitions},
            # state_dir: this deployment's own dedup stores (tests reuse app_ids; workers restarted share it)
            "worker": {"clock": "event", "web_port": free_port(), "session_timeout": "3s",
                       "state_dir": os.path.join(workdir, f"state-{self.prefix}")},
            "redis": {"enabled": False},  # tests of the serving layer pass redis={"enabled": True, ...}
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                data.setdefault(key, {}).update(value)
            else:
                data[key] = value
        self.settings: Settings = from_mapping(data, "<test>", env={})
        self.topics = Topics(self.prefix, self.settings.worker.app_id)
        self.partitions = admin.ensure_topics(bootstrap, self.topics, partitions)
        data = self.settings.model_dump(mode="json")
        kpis = self.settings.kpis_path()
        data["kpis"] = str(kpis.resolve()) if kpis is not None else None  # the config is written elsewhere
        self.config_path = bf.write_config(data, workdir)
        self.workers: list = []

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.worker.web_port}"

    def produce(self, lines: Iterable[bytes]) -> int:
        return admin.produce_lines(self.bootstrap, self.topics.events, lines)

    def mark(self, until_ms: int) -> None:
        admin.send_watermark(self.bootstrap, self.topics.events, self.partitions, until_ms)

    def start_worker(self, env: dict[str, str] | None = None):
        proc = bf.spawn_worker(self.config_path, os.path.join(self.workdir, f"worker-{len(self.workers)}.log"),
                               env=env)
        self.workers.append(proc)
        return proc

    def kill(self, proc) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def log(self) -> str:
        """The end of every worker's log (for assertion messages)."""
        return "\n".join(f"--- worker-{i} ---\n" + self.worker_log(i)[-4000:] for i in range(len(self.workers)))

    def worker_log(self, i: int) -> str:
        """All of worker ``i``'s log."""
        with open(os.path.join(self.workdir, f"worker-{i}.log"), errors="replace") as fh:
            return fh.read()

    def logged(self, text: str) -> bool:
        """Whether any worker logged ``text``."""
        return any(text in self.worker_log(i) for i in range(len(self.workers)))

    def report(self, until_ms: int, timeout_s: float = 180) -> dict:
        reader = bf.PeriodsReader(self.bootstrap, self.topics.periods)
        try:
            alive = lambda: any(w.poll() is None for w in self.workers)  # noqa: E731 - a one-line probe passed once
            try:
                reader.wait_for(until_ms, timeout_s, alive=alive)
            except bf.BackfillError as err:
                raise AssertionError(f"{err}\n{self.log()}") from None
            reader.poll(300)
            return bf.build_report(reader.closed.values(), reader.watermark, self.settings,
                                   bf.latest_snapshots(self.bootstrap, self.topics.snapshots))
        finally:
            reader.close()

    def records(self, topic: str) -> list:
        return admin.consume_all(self.bootstrap, topic)

    def close(self) -> None:
        for proc in self.workers:
            bf.stop_worker(proc)


@pytest.fixture
def pipeline_factory(tmp_path) -> Iterator:
    made: list[Pipeline] = []

    def make(bootstrap: str, **kwargs: Any) -> Pipeline:
        p = Pipeline(bootstrap, str(tmp_path), **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def by_period(report: dict) -> dict:
    return {(p["grain"], p["period"]): p["metrics"] for p in report["periods"]}
