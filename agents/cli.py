"""The ``kpimon`` command."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from config.settings import ConfigError, Settings, load

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="kpimon: streaming KPI monitor for user operations (AARRR, lifecycle, KPI targets).")
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Path to kpimon.yaml (default: the packaged defaults).",
                         envvar="KPIMON_CONFIG")


def _config_error(exc: ConfigError) -> typer.Exit:
    err.print(f"[red]configuration error[/red]\n{exc}")
    return typer.Exit(2)


def _settings(path: Optional[Path]) -> Settings:
    try:
        return load(path)
    except ConfigError as exc:
        raise _config_error(exc) from None


def _kpi_spec(settings: Settings):  # noqa: ANN202 - config.kpis.KpiSpec | None
    try:
        return settings.load_kpis()
    except ConfigError as exc:
        raise _config_error(exc) from None


@app.command()
def worker(config: Optional[Path] = ConfigOpt,
           loglevel: str = typer.Option("info", help="Log level (debug, info, warning, error).")) -> None:
    """Run the agents: ingest, lifecycle and periods, aggregation, /metrics."""
    import faust

    from agents.app import create_app

    settings = _settings(config)
    faust_app = create_app(settings, kpi_spec=_kpi_spec(settings))
    w = faust.Worker(faust_app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    w.execute_from_commandline()


@app.command()
def broker(port: int = typer.Option(9092, help="Port on 127.0.0.1."),
           apache: bool = typer.Option(False, "--apache", help="Run Apache Kafka (Java) instead of Tansu.")) -> None:
    """Run an embedded Kafka-protocol broker in the foreground (Ctrl-C or SIGTERM stops it)."""
    import signal
    import time

    def _stop(signum, frame):  # noqa: ANN001, ARG001 - SIGTERM stops the broker like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)

    if apache:
        from agents.runtime.apache_kafka import ApacheKafka as Broker
    else:
        from agents.runtime.tansu import TansuBroker as Broker
    with Broker(port=port) as b:
        err.print(f"broker ready on [bold]{b.bootstrap}[/bold] (KPIMON_BROKER=kafka://{b.bootstrap})")
        try:
            while b.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@app.command()
def send(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON-lines events."),
         config: Optional[Path] = ConfigOpt,
         broker_url: Optional[str] = typer.Option(None, "--broker", help="Override kafka.broker.")) -> None:
    """Produce JSON-lines events to kpimon.events, keyed by user_id."""
    from rich.progress import Progress

    from streams import admin
    from streams.topics import Topics

    settings = _settings(config)
    bootstrap = (broker_url or settings.kafka.broker).split("://", 1)[-1]
    topics = Topics(settings.kafka.topic_prefix, settings.worker.app_id)
    admin.ensure_topics(bootstrap, topics, settings.kafka.partitions)
    total = sum(1 for _ in admin.read_lines(str(file)))
    with Progress(console=err) as progress:
        task = progress.add_task(f"sending to {topics.events}", total=total)
        n = admin.produce_lines(bootstrap, topics.events, admin.read_lines(str(file)),
                                lambda k: progress.advance(task, k))
    err.print(f"sent {n} events")


@app.command()
def backfill(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON-lines history."),
             until: Optional[str] = typer.Option(None, help="Advance the clock to this instant (RFC 3339 or epoch "
                                                            "ms) once the input is consumed."),
             out: Optional[Path] = typer.Option(None, help="Write the JSON report here (default: stdout)."),
             broker_url: Optional[str] = typer.Option(None, "--broker",
                                                      help="Use this broker instead of the embedded one."),
             partitions: Optional[int] = typer.Option(None, help="Partitions of the fresh events topic."),
             config: Optional[Path] = ConfigOpt) -> None:
    """Run a history file through the real pipeline and write the closed-period report."""
    from rich.progress import Progress

    from agents import backfill as bf
    from streams import admin

    settings = _settings(config)
    total = sum(1 for _ in admin.read_lines(str(file)))
    try:
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("producing", total=total)
            report = bf.run(str(file), settings, until=until, broker=broker_url, partitions=partitions,
                            on_produced=lambda k: progress.advance(task, k), log=err.print)
    except (bf.BackfillError, ValueError) as exc:
        err.print(f"[red]backfill failed:[/red] {exc}")
        raise typer.Exit(1) from None
    text = json.dumps(report, indent=2)
    if out is None:
        sys.stdout.write(text + "\n")
    else:
        out.write_text(text + "\n")
        ev = report["events"]
        err.print(f"wrote {out}: {len(report['periods'])} closed periods; events accepted {ev['accepted']}, "
                  f"rejected {ev['rejected']}, duplicates {ev['duplicates']}, late {ev['late']}")


@app.command()
def demo(config: Optional[Path] = ConfigOpt,
         duration: Optional[float] = typer.Option(None, help="Stop after this many seconds (default: Ctrl-C)."),
         rate: float = typer.Option(200.0, help="Simulated events per second."),
         users: int = typer.Option(2000, help="Simulated user base."),
         web_port: int = typer.Option(6066, help="Port of the worker's /metrics.")) -> None:
    """Embedded broker + worker + simulated traffic on compressed time, with a live summary."""
    from agents.demo import run_demo

    settings = _settings(config) if config else None
    run_demo(settings, duration=duration, rate=rate, users=users, web_port=web_port, console=err)


from agents import cli_ledger  # noqa: E402,F401 - registers kpis, snapshots, scorecard, targets


users_app = typer.Typer(no_args_is_help=True, help="Per-user serving layer in Redis (lifecycle state, at-risk lists).")


@users_app.command("at-risk")
def users_at_risk(state: str = typer.Option(..., "--state", help="active, silent, sleeping, churned or dead."),
                  fmt: str = typer.Option("csv", "--format", help="csv or json."),
                  limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many users."),
                  config: Optional[Path] = ConfigOpt) -> None:
    """Export the users in a lifecycle state for outreach, longest inactive first (reads Redis)."""
    import asyncio

    from agents import serving
    from agents.core.lifecycle import STATES
    from agents.core.periods import Calendar

    settings = _settings(config)
    if state not in STATES or fmt not in ("csv", "json"):
        err.print(f"[red]--state must be one of {', '.join(STATES)}; --format csv or json[/red]")
        raise typer.Exit(2)

    async def run() -> int:
        client = serving.connect(settings.redis.url)
        try:
            return await serving.export_at_risk(client, settings.redis.key_prefix, state, fmt,
                                                Calendar(settings.timezone), sys.stdout.write, limit)
        finally:
            await client.aclose()

    try:
        n = asyncio.run(run())
    except serving.redis_errors() as exc:
        err.print(f"[red]serving layer unavailable at {settings.redis.url}:[/red] {exc}")
        raise typer.Exit(1) from None
    err.print(f"{n} users in state {state}")


@users_app.command("get")
def users_get(user_id: str = typer.Argument(..., help="The user_id."), config: Optional[Path] = ConfigOpt) -> None:
    """One user's serving state as JSON (reads Redis)."""
    import asyncio

    from agents import serving
    from agents.core.periods import Calendar

    settings = _settings(config)

    async def run() -> Optional[dict]:
        client = serving.connect(settings.redis.url)
        try:
            return await serving.get_user(client, settings.redis.key_prefix, user_id)
        finally:
            await client.aclose()

    try:
        user = asyncio.run(run())
    except serving.redis_errors() as exc:
        err.print(f"[red]serving layer unavailable at {settings.redis.url}:[/red] {exc}")
        raise typer.Exit(1) from None
    if user is None:
        err.print(f"unknown user {user_id!r}")
        raise typer.Exit(1)
    sys.stdout.write(json.dumps(serving.present(user, Calendar(settings.timezone)), indent=2) + "\n")


app.add_typer(users_app, name="users")


def main() -> None:
    logging.basicConfig(level=os.environ.get("KPIMON_LOGLEVEL", "WARNING"))
    app()


if __name__ == "__main__":
    # Run through the importable module so that sub-commands registered on
    # ``agents.cli.app`` by other modules (agents.cli_ledger) are present.
    from agents.cli import main as _main

    _main()
