"""The kpimon command: one module per command group, registered on one typer app.

``common`` holds what the groups share; ``pipeline`` (worker, broker, send,
backfill, demo), ``users`` and ``ledger`` (kpis, snapshots, scorecard,
targets) register their commands on import.

Exit codes (``kpimon.errors``): 0 success, 1 a runtime failure (the broker or
Redis unreachable, a service, the demo or a backfill failed), 2 a configuration
or usage error, 3 a backfill with late refusals.  The app (``common._Group``)
prints every expected failure as one line, without a traceback.
"""

from __future__ import annotations

import logging
import os

from kpimon.agents.cli import ledger, pipeline, users
from kpimon.agents.cli.common import app

__all__ = ["app", "main", "ledger", "pipeline", "users"]


def main() -> None:
    level = os.environ.get("KPIMON_LOGLEVEL")
    logging.basicConfig(level=level or "WARNING")
    if level is None:
        # kafka-python logs every failed connection attempt as an error (dozens of lines while a broker is
        # down); the command reports the outcome in one line.  KPIMON_LOGLEVEL=DEBUG shows them again.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    app()
