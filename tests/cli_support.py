"""What the CLI tests share: running the real ``kpimon`` app under typer's CliRunner."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from kpimon.agents.cli import app


@pytest.fixture(autouse=True)
def no_kpimon_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each CLI test sees only the KPIMON_* variables it sets itself."""
    for var in [v for v in os.environ if v.startswith("KPIMON_")]:
        monkeypatch.delenv(var)
    yield


def invoke(args: list[str], env: dict[str, str] | None = None):
    # catch_exceptions=False: an exception the command does not map fails the test with its traceback
    return CliRunner().invoke(app, args, env=env or {}, catch_exceptions=False)


def flat(text: str) -> str:
    """Output without rich's line wrapping."""
    return "".join(text.split())
