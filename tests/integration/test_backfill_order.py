"""Backfill on real Apache Kafka: the report does not depend on the order of the file's lines,
and a user's own ``config.py`` or ``agents/`` in the working directory does not break it."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from kpimon.agents.tools import backfill as bf
from kpimon.agents.tools.datasets import generate
from kpimon.config.settings import from_mapping

pytestmark = pytest.mark.integration

START = 1_704_067_200_000  # 2024-01-01T00:00:00Z
DAY = 86_400_000


def _history(n: int, seed: int) -> list[bytes]:
    lines = list(generate(n, start_ms=START, seed=seed, users=n // 33, bad_ratio=0.005, duplicate_ratio=0.01))
    # The same event_id twice with different content (and the same ts and user): the dedup keeps
    # whichever comes first, so the backfill's order must not come from the file's order.
    twins = [orjson.loads(line) for line in lines[::n // 80] if b'"purchase"' in line or b'"login"' in line]
    assert len(twins) >= 3
    for ev in twins:
        ev["amount"] = "1.23"
        ev["type"] = "purchase"
    return lines + [orjson.dumps(ev) for ev in twins]


def test_a_shuffled_history_gives_the_byte_identical_report(kafka, tmp_path, monkeypatch):
    sorts: list[bf.SortedHistory] = []
    real_sort = bf.sort_history
    monkeypatch.setattr(bf, "sort_history", lambda *a, **kw: sorts.append(real_sort(*a, **kw)) or sorts[-1])
    lines = _history(10_000, seed=23)
    shuffled = lines[:]
    random.Random(5).shuffle(shuffled)
    settings = from_mapping({"kafka": {"partitions": 4}}, "<test>", env={})
    until = str(START + 200 * DAY)
    texts = []
    for name, order in (("sorted", lines), ("shuffled", shuffled)):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"\n".join(order) + b"\n")
        work = tmp_path / f"work-{name}"
        work.mkdir()
        # A small sort memory (a twelfth of the ~2.4 MB the records take in memory): the file is sorted
        # in runs on disk (about a dozen), then merged.
        report = bf.run(str(path), settings, until=until, broker=kafka.bootstrap, partitions=4,
                        workdir=str(work), sort_memory=200_000, timeout_s=300)
        assert sorts[-1].runs >= 8, sorts[-1].runs  # the multi-way merge of run files really ran
        assert not [f for f in os.listdir(work) if f.startswith("sort-run-")]  # the runs are cleaned up
        ev = report["events"]
        assert ev["late"] == 0, ev
        assert ev["accepted"] + ev["rejected"] + ev["duplicates"] == len(lines), ev
        assert ev["rejected"] > 0 and ev["duplicates"] > 0
        texts.append(json.dumps(report, indent=2))
    assert len(orjson.loads(texts[0])["periods"]) > 20
    assert texts[0] == texts[1]


def _kpimon() -> list[str]:
    exe = Path(sys.executable).with_name("kpimon")
    return [str(exe)] if exe.exists() else [shutil.which("kpimon") or "kpimon"]


def test_backfill_from_a_folder_with_its_own_config_and_agents_modules(kafka, tmp_path):
    """The child worker must import kpimon's packages, not the ones in the working directory."""
    cwd = tmp_path / "project"
    (cwd / "agents").mkdir(parents=True)
    (cwd / "agents" / "__init__.py").write_text("raise ImportError('the user folder shadows kpimon')\n")
    (cwd / "streams").mkdir()
    (cwd / "streams" / "__init__.py").write_text("raise ImportError('the user folder shadows kpimon')\n")
    (cwd / "config.py").write_text("raise ImportError('the user folder shadows kpimon')\n")
    lines = list(generate(300, start_ms=START, seed=4, users=40))
    (cwd / "history.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPIMON_") and k != "PYTHONPATH"}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb")
    proc = subprocess.run([*_kpimon(), "backfill", "history.jsonl", "--broker", kafka.bootstrap,
                           "--partitions", "2", "--out", "report.json"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = orjson.loads((cwd / "report.json").read_bytes())
    assert report["events"]["accepted"] == len(lines)
    assert report["events"]["late"] == 0
