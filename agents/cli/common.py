"""What every command group shares: the typer app, the error console, the --config option, settings loading."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from kpimon.config.settings import ConfigError, Settings, load

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="kpimon: streaming KPI monitor for user operations (AARRR, lifecycle, KPI targets).")
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Path to kpimon.yaml (default: the packaged defaults).",
                         envvar="KPIMON_CONFIG")


def config_error(exc: ConfigError) -> typer.Exit:
    err.print(f"[red]configuration error[/red]\n{exc}")
    return typer.Exit(2)


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
