"""README "Quick start with a real broker", without Docker, followed literally on both embedded brokers.

`kpimon broker [--apache]` on a fresh broker, then `kpimon worker --config local.yaml` (no Redis), then
`kpimon send events.jsonl` and `kpimon kpis --worker URL`: the real console script, in child processes,
as a user runs them.  Only the ports differ from the README (free ones, via --port and the environment).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kpimon.agents.runtime.ports import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def kpimon(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["kpimon", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@pytest.mark.parametrize("flavour", ["tansu", "apache"])
def test_readme_quick_start_without_docker(flavour, tmp_path):
    assert shutil.which("kpimon"), "the kpimon console script is not on PATH (pip install -e .)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPIMON_")}
    port, web = free_port(), free_port()
    env.update(KPIMON_BROKER=f"kafka://127.0.0.1:{port}", KPIMON_WEB_PORT=str(web),
               XDG_STATE_HOME=str(tmp_path / "state"))  # the worker's default state_dir, fresh per run
    procs: list[subprocess.Popen] = []
    try:
        # Terminal 1: the broker.
        broker_log = tmp_path / "broker.log"
        cmd = ["kpimon", "broker", "--port", str(port)] + (["--apache"] if flavour == "apache" else [])
        broker = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=open(broker_log, "wb"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(broker)
        deadline = time.monotonic() + 90
        while "broker ready" not in broker_log.read_text(errors="replace"):
            assert broker.poll() is None and time.monotonic() < deadline, broker_log.read_text(errors="replace")
            time.sleep(0.2)

        # Without Redis: the README's local.yaml, then the worker on the fresh broker.
        (tmp_path / "local.yaml").write_text(f"kpis: {REPO / 'config' / 'kpis.yaml'}\nredis:\n  enabled: false\n")
        worker_log = tmp_path / "worker.log"
        worker = subprocess.Popen(["kpimon", "worker", "--config", "local.yaml"], env=env, cwd=tmp_path,
                                  stdout=open(worker_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)

        # Terminal 2: two events at the wall clock, sent, then the live scorecard.
        now = int(time.time() * 1000)
        (tmp_path / "events.jsonl").write_text(
            f'{{"event_id":"e1","user_id":"u1","type":"signup","ts":{now},"channel":"organic"}}\n'
            f'{{"event_id":"e2","user_id":"u1","type":"purchase","ts":{now},"amount":"19.90"}}\n')
        sent = kpimon("send", "events.jsonl", env=env, cwd=tmp_path)
        assert sent.returncode == 0 and "sent 2 events" in sent.stderr, sent.stderr

        deadline = time.monotonic() + 90
        while True:
            assert worker.poll() is None, worker_log.read_text(errors="replace")
            kpis = kpimon("kpis", "--worker", f"http://127.0.0.1:{web}", env=env, cwd=tmp_path)
            if kpis.returncode == 0 and "revenue" in kpis.stdout:  # a KPI of the packaged spec, evaluated
                break
            assert time.monotonic() < deadline, kpis.stdout + kpis.stderr + worker_log.read_text(errors="replace")
            time.sleep(0.5)
        assert "Owners" in kpis.stdout, kpis.stdout

        log = worker_log.read_text(errors="replace")
        assert "PartitionsMismatch" not in log, log[-4000:]
        assert not re.search(r"Topic \S+ not found", log), log[-4000:]
        assert "loop crashed" not in log and "Traceback" not in log, log[-4000:]
        assert stop(worker) == 0, worker_log.read_text(errors="replace")[-4000:]  # SIGTERM: a clean stop
    finally:
        for proc in reversed(procs):
            stop(proc)
