"""The pipeline commands: worker, broker, send, backfill, demo."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from kpimon.agents.cli.common import ConfigOpt, app, err, load_kpi_spec, load_settings


@app.command()
def worker(config: Path | None = ConfigOpt,
           loglevel: str = typer.Option("info", help="Log level (debug, info, warning, error).")) -> None:
    """Run the agents: ingest, lifecycle and periods, aggregation, /metrics.

    Exit codes: 0 stopped (SIGTERM, Ctrl-C); 1 a loop failed, or the broker was unreachable at
    start-up (a restart may help); 2 a configuration error, or an existing topic with the wrong
    partition count (a restart does not help).
    """
    from kpimon.agents.worker.arenas import limit_arenas

    limit_arenas()  # before any thread starts (docs/performance.md, soak)
    import faust

    from kpimon.agents.worker.app import create_app, internal_topics
    from kpimon.streams import admin
    from kpimon.streams.topics import Topics

    settings = load_settings(config)
    faust_app = create_app(settings, kpi_spec=load_kpi_spec(settings))
    # Every topic exists with its partition count before any agent or consumer starts: on a fresh
    # broker faust would otherwise subscribe first and the broker auto-create them (wrong counts).
    bootstrap = settings.kafka.bootstrap
    try:
        admin.ensure_topics(bootstrap, Topics(settings.kafka.topic_prefix, settings.worker.app_id),
                            settings.kafka.partitions, extra=internal_topics(faust_app))
    except admin.TopicMismatch as exc:
        err.print(f"[red]topic error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - the broker is unreachable or refuses: say so in one line
        err.print(f"[red]cannot prepare the topics on {bootstrap}:[/red] {type(exc).__name__}: {exc}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    w = faust.Worker(faust_app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    faust_app.kpimon_on_fatal = _exit_on_fatal(w)
    w.execute_from_commandline()


STOP_GRACE_S = 30.0  # after a loop failed: the graceful stop's time limit before the process is ended hard


def _exit_on_fatal(w):
    """A loop failed: stop the worker as SIGTERM does, then exit with code 1 (the reason re-raised)."""
    import signal
    import threading

    def force_exit() -> None:
        sys.stderr.write(f"kpimon worker: not stopped within {STOP_GRACE_S:.0f}s after a failure; exiting (1)\n")
        sys.stderr.flush()
        os._exit(1)

    def on_fatal(reason: BaseException) -> None:
        w.crash_reason = reason  # mode's Worker re-raises it once stopped: exit code 1
        timer = threading.Timer(STOP_GRACE_S, force_exit)
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)

    return on_fatal


@app.command()
def broker(port: int = typer.Option(9092, help="Port on 127.0.0.1."),
           apache: bool = typer.Option(False, "--apache", help="Run Apache Kafka (Java) instead of Tansu.")) -> None:
    """Run an embedded Kafka-protocol broker in the foreground (Ctrl-C or SIGTERM stops it)."""
    import signal
    import time

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)

    from kpimon.agents.runtime.kafka_common import KafkaBrokerProcess

    broker_cls: type[KafkaBrokerProcess]
    if apache:
        from kpimon.agents.runtime.apache_kafka import ApacheKafka

        broker_cls = ApacheKafka
    else:
        from kpimon.agents.runtime.tansu import TansuBroker

        broker_cls = TansuBroker
    with broker_cls(port=port) as b:
        err.print(f"broker ready on [bold]{b.bootstrap}[/bold] (KPIMON_BROKER=kafka://{b.bootstrap})")
        try:
            while b.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@app.command()
def send(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON-lines events."),
         config: Path | None = ConfigOpt,
         broker_url: str | None = typer.Option(None, "--broker", help="Override kafka.broker.")) -> None:
    """Produce JSON-lines events to kpimon.events, keyed by user_id."""
    from rich.progress import Progress

    from kpimon.streams import admin
    from kpimon.streams.topics import Topics

    settings = load_settings(config)
    bootstrap = (broker_url or settings.kafka.broker).split("://", 1)[-1]
    topics = Topics(settings.kafka.topic_prefix, settings.worker.app_id)
    admin.ensure_topics(bootstrap, topics, settings.kafka.partitions, wait_s=admin.CLI_WAIT_S)
    total = sum(1 for _ in admin.read_lines(str(file)))
    with Progress(console=err) as progress:
        task = progress.add_task(f"sending to {topics.events}", total=total)
        n = admin.produce_lines(bootstrap, topics.events, admin.read_lines(str(file)),
                                lambda k: progress.advance(task, k))
    err.print(f"sent {n} events")


LATE_EXIT = 3  # `kpimon backfill`: the worker refused events as late (the report lacks them)


def _late_verdict(report: dict, allow_late: bool) -> tuple[str | None, int]:
    """The warning and the exit code of a finished backfill: late refusals fail it unless allowed."""
    late = report["events"]["late"]
    if not late:
        return None, 0
    warning = (f"warning: the worker refused {late} events as late; the report does not count them. "
               "A backfill sends the events in time order, so this should not happen; check the worker "
               "log and the late topic.")
    return warning, 0 if allow_late else LATE_EXIT


@app.command()
def backfill(file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON-lines history."),
             until: str | None = typer.Option(None, help="Advance the clock to this instant (RFC 3339 or epoch "
                                                            "ms) once the input is consumed."),
             out: Path | None = typer.Option(None, help="Write the JSON report here (default: stdout)."),
             broker_url: str | None = typer.Option(None, "--broker",
                                                      help="Use this broker instead of the embedded one."),
             partitions: int | None = typer.Option(None, help="Partitions of the fresh events topic."),
             sort_memory: int = typer.Option(256, "--sort-memory", min=1,
                                             help="MiB of memory for sorting the file by event time; larger "
                                                  "files are sorted in runs on disk."),
             allow_late: bool = typer.Option(False, "--allow-late",
                                             help=f"Exit 0 even if events were refused as late (otherwise "
                                                  f"{LATE_EXIT})."),
             config: Path | None = ConfigOpt) -> None:
    """Run a history file (in any order) through the real pipeline and write the closed-period report."""
    from rich.progress import Progress

    from kpimon.agents.tools import backfill as bf
    from kpimon.streams import admin

    settings = load_settings(config)
    total = sum(1 for _ in admin.read_lines(str(file)))
    try:
        with Progress(console=err, transient=True) as progress:
            task = progress.add_task("producing", total=total)
            report = bf.run(str(file), settings, until=until, broker=broker_url, partitions=partitions,
                            sort_memory=sort_memory * 2**20, on_produced=lambda k: progress.advance(task, k),
                            log=err.print)
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
    warning, code = _late_verdict(report, allow_late)
    if warning is not None:
        err.print(f"[bold red]{warning}[/bold red]", highlight=False)
    if code:
        raise typer.Exit(code)


@app.command()
def demo(config: Path | None = ConfigOpt,
         duration: float | None = typer.Option(None, help="Stop after this many seconds (default: Ctrl-C)."),
         rate: float = typer.Option(200.0, help="Simulated events per second."),
         users: int = typer.Option(2000, help="Simulated user base."),
         web_port: int | None = typer.Option(None, help="Port of the worker's /metrics (default: worker.web_port "
                                                           "of the configuration, or KPIMON_WEB_PORT).")) -> None:
    """Embedded broker + worker + simulated traffic on compressed time, with a live summary."""
    from kpimon.agents.tools import demo as demo_mod

    # file, then environment (load applies KPIMON_*), then flags; config/demo.yaml without --config
    settings = load_settings(config if config is not None else demo_mod.DEMO_CONFIG)
    demo_mod.run_demo(settings, duration=duration, rate=rate, users=users,
                      web_port=settings.worker.web_port if web_port is None else web_port, console=err)
