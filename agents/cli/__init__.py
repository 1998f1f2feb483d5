"""The kpimon command: one module per command group, registered on one typer app.

``common`` holds what the groups share; ``pipeline`` (worker, broker, send,
backfill, demo), ``users`` and ``ledger`` (kpis, snapshots, scorecard,
targets) register their commands on import.
"""

from __future__ import annotations

import logging
import os

from kpimon.agents.cli import ledger, pipeline, users
from kpimon.agents.cli.common import app

__all__ = ["app", "main", "ledger", "pipeline", "users"]


def main() -> None:
    logging.basicConfig(level=os.environ.get("KPIMON_LOGLEVEL", "WARNING"))
    app()
