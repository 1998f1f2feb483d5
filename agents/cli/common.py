"""What every command group shares: the typer app, the error console, the --config option, settings loading.

Every expected failure is a :class:`~kpimon.errors.KpimonError`: the app prints
its message as one line on stderr, without a traceback, and exits with its
``exit_code`` (the table is in ``kpimon.errors`` and docs/operations.md#exit-codes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from kpimon.config.settings import ConfigError, Settings, load
from kpimon.errors import EXIT_RUNTIME, KpimonError

err = Console(stderr=True)

# Broker errors of the Kafka clients that mean "nobody answers" (matched by name: importing the clients is slow).
_UNREACHABLE = {("kafka.errors", "NoBrokersAvailable"), ("kafka.errors", "KafkaConnectionError"),
                ("aiokafka.errors", "KafkaConnectionError")}


def _unreachable(exc: BaseException) -> bool:
    return any((c.__module__, c.__name__) in _UNREACHABLE for c in type(exc).__mro__)


def fail(exc: BaseException) -> typer.Exit:
    """Print an expected failure as one line on stderr; the Exit to raise (``raise fail(exc) from None``)."""
    if isinstance(exc, ConfigError):
        err.print(f"[red]configuration error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return typer.Exit(exc.exit_code)
    if isinstance(exc, KpimonError):
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return typer.Exit(exc.exit_code)
    name, text = type(exc).__name__, str(exc)
    detail = text if text.startswith(name) else f"{name}: {text}"
    err.print(f"[red]error:[/red] cannot reach the broker: {escape(detail)}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_RUNTIME)


class _Group(TyperGroup):
    """The root command: maps every :class:`KpimonError` (and an unreachable broker) to one line and its exit code."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer >= 0.20 vendors click: its own type)
        try:
            return super().invoke(ctx)
        except KpimonError as exc:
            raise fail(exc) from None
        except Exception as exc:
            if _unreachable(exc):
                raise fail(exc) from None
            raise


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  help="kpimon: streaming KPI monitor for user operations (AARRR, lifecycle, KPI targets).")

ConfigOpt = typer.Option(None, "--config", "-c", help="Path to kpimon.yaml (default: the packaged defaults).",
                         envvar="KPIMON_CONFIG")


def config_error(exc: ConfigError) -> typer.Exit:
    """Print a configuration error (one line per fault); the Exit (status 2) to raise."""
    return fail(exc)


def load_settings(path: Path | None) -> Settings:
    try:
        return load(path)
    except ConfigError as exc:
        raise config_error(exc) from None


def load_kpi_spec(settings: Settings):
    try:
        return settings.load_kpis()
    except ConfigError as exc:
        raise config_error(exc) from None
