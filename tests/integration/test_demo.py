"""Smoke test of ``kpimon demo``: embedded Tansu broker, real worker, simulated live traffic."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from kpimon.agents.runtime.ports import free_port
from kpimon.agents.tools.demo import run_demo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_demo_runs_and_its_figures_move() -> None:
    port = free_port()
    out = io.StringIO()
    # 15 s at 500 events/s: as many events (and ~0.5 % bad lines) as 25 s at 300/s, 10 s sooner.
    figures = run_demo(None, duration=15, rate=500, users=300, web_port=port, console=Console(file=out, width=160))
    text = out.getvalue()
    assert f"http://127.0.0.1:{port}/metrics" in text
    assert figures["scraped"], text
    assert figures["produced"] > 1000, text
    assert figures["accepted"] > 0, text
    assert figures["rejected"] > 0, text  # the ~0.5 % bad lines reached the dead-letter counter
    assert set(figures["rejected_by_reason"]) >= {"not_json", "missing_field"}
    assert sum(figures["population"].values()) > 0, text
    assert figures["population"]["active"] > 0
    assert figures["signups_by_channel"], text
    assert figures["revenue"] > 0
    assert "day" in figures["period"]
    assert "demo stopped" in text


def test_kpimon_help_lists_demo() -> None:
    exe = Path(sys.executable).with_name("kpimon")
    cmd = [str(exe)] if exe.exists() else [shutil.which("kpimon") or "kpimon"]
    env = dict(os.environ, COLUMNS="120", NO_COLOR="1", TERM="dumb")
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout
    proc = subprocess.run([*cmd, "demo", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    for option in ("--duration", "--rate", "--users", "--web-port"):
        assert option in proc.stdout
