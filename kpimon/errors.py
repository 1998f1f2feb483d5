"""The one error base of kpimon, and the exit codes of the ``kpimon`` command.

Every expected failure raised by kpimon derives from :class:`KpimonError`; the
command (``kpimon.agents.cli.main``) prints its message as one line on stderr,
without a traceback, and exits with the class's :attr:`KpimonError.exit_code`:

==  ==========================================================================
0   success
1   a runtime failure: the broker or Redis is unreachable, a service did not
    start, the demo or a backfill failed, the worker stopped on an error
    (a retry or a restart may help)
2   a configuration or usage error: a bad ``kpimon.yaml`` or KPI spec, an
    existing topic with the wrong partition count, a bad option (typer's own
    usage errors exit 2 too); a retry does not help until it is fixed
3   ``kpimon backfill`` finished, but the worker refused events as late
    (the report lacks them); ``--allow-late`` makes it 0
==  ==========================================================================

This module is pure (no third-party imports): the pure core imports it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_LATE = 3


class KpimonError(Exception):
    """An expected kpimon failure; its message is one line that says what failed and where."""

    __slots__ = ()  # cheap: Rejected (a subclass) is raised once per bad event on the hot path
    exit_code: int = EXIT_RUNTIME


class BrokerUnavailable(KpimonError):
    """The Kafka broker cannot be reached (nothing listening, wrong address, timed out)."""

    exit_code = EXIT_RUNTIME


class RedisUnavailable(KpimonError):
    """Redis (the serving layer, the snapshot store) cannot be reached."""

    exit_code = EXIT_RUNTIME
