"""The worker caps glibc's malloc arenas, unless MALLOC_ARENA_MAX says otherwise."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from kpimon.agents.worker.arenas import limit_arenas; print(limit_arenas())"


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env_extra
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_ARENA_MAX) is glibc's")
def test_glibc_accepts_the_cap() -> None:
    assert _run({}) == "True"


def test_the_environment_wins() -> None:
    assert _run({"MALLOC_ARENA_MAX": "4"}) == "False"
