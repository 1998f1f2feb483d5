"""Fence: the pure core never pulls in the stream framework, Kafka or Prometheus.

Every module under ``agents/core`` plus ``streams/events.py`` is imported in a
fresh interpreter, then ``sys.modules`` is checked.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import kpimon.agents.core

FORBIDDEN = ("faust", "prometheus_client", "aiokafka")
ROOT = Path(__file__).resolve().parents[3]


def core_modules() -> list[str]:
    names = [f"kpimon.agents.core.{m.name}" for m in pkgutil.iter_modules(kpimon.agents.core.__path__)]
    return ["kpimon.agents.core", *sorted(names), "kpimon.streams.events"]


def test_core_modules_are_found() -> None:
    mods = core_modules()
    for expected in ("kpimon.agents.core.engine", "kpimon.agents.core.lifecycle", "kpimon.agents.core.metrics",
                     "kpimon.agents.core.aggregate", "kpimon.agents.core.periods"):
        assert expected in mods


def test_core_imports_no_framework() -> None:
    mods = core_modules()
    code = (
        "import importlib, json, sys\n"
        f"for name in {mods!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    bad = json.loads(out.stdout.strip().splitlines()[-1])
    assert bad == [], f"the pure core imported {bad}"


def test_fence_detects_a_framework_import() -> None:
    """The check itself works: importing the ingest service does pull aiokafka in."""
    code = "import sys, kpimon.agents.worker.ingest; print('aiokafka' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
