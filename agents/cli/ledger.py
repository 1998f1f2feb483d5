"""CLI commands on KPIs and the period-close ledger: kpis, snapshots, cohorts, scorecard, targets."""

from __future__ import annotations

import io
import json
import sys
import urllib.error
import urllib.request
from fractions import Fraction
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from kpimon.agents.cli.common import ConfigOpt, app, err, load_kpi_spec, load_settings
from kpimon.agents.core.periods import Calendar
from kpimon.agents.serving import csvsafe, redis_client
from kpimon.agents.serving.snapshots import list_periods, read_versions
from kpimon.streams.events import parse_instant

snapshots_app = typer.Typer(help="The period-close ledger: every version of every closed period.", no_args_is_help=True)
targets_app = typer.Typer(help="Targets from history.", no_args_is_help=True)
app.add_typer(snapshots_app, name="snapshots")
app.add_typer(targets_app, name="targets")
out = Console()


def _redis(settings: Any):
    """A synchronous client of the ledger's Redis, checked; :class:`RedisUnavailable` (exit 1) if it is down."""
    client = redis_client.client(settings.redis.url, asyncio=False)
    try:
        client.ping()
    except redis_client.errors() as exc:
        raise redis_client.unavailable(settings.redis.url, exc) from None
    return client


def _prefix(settings: Any) -> str:
    return settings.redis.key_prefix


def _grain_of(period: str) -> str:
    if "-W" in period:
        return "week"
    if "-Q" in period:
        return "quarter"
    return {4: "year", 7: "month", 10: "day"}.get(len(period), "day")


def _latest(settings: Any, grain: str, period: str) -> dict[str, Any]:
    versions = read_versions(_redis(settings), _prefix(settings), grain, period)
    if not versions:
        err.print(f"[red]no snapshot for {grain} {period}[/red] (is the worker's redis.url the same?)")
        raise typer.Exit(1)
    return versions[-1]


def worker_url(settings: Any) -> str:
    """``http://web_host:web_port`` of the configured worker (a wildcard bind address asks loopback)."""
    host = settings.worker.web_host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.worker.web_port}"


@app.command()
def kpis(worker: str | None = typer.Option(None, help="URL of the worker running the aggregation (default: "
                                                         "http://<worker.web_host>:<worker.web_port> of the "
                                                         "configuration, after KPIMON_WEB_HOST/KPIMON_WEB_PORT)."),
         as_json: bool = typer.Option(False, "--json", help="Print the raw evaluation."),
         config: Path | None = ConfigOpt) -> None:
    """Live scorecard of the open periods (from the worker's /api/kpis)."""
    if worker is None:
        worker = worker_url(load_settings(config))
    try:
        with urllib.request.urlopen(f"{worker.rstrip('/')}/api/kpis", timeout=10) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        err.print(f"[red]{exc.code}[/red] {exc.read().decode(errors='replace')}")
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]cannot reach {worker}:[/red] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    table = Table(title=f"KPIs as of {data.get('as_of')}")
    for col in ("KPI", "period", "actual", "target", "attainment", "expected", "projected", "status"):
        table.add_column(col)
    colour = {"on_track": "green", "at_risk": "yellow", "off_track": "red"}
    for k in data["kpis"]:
        st = k["status"]
        table.add_row(k["kpi"], k["period"], str(k["actual"]), str(k["target"]), str(k["attainment"]),
                      str(k["expected_progress"]), str(k["projected_attainment"]),
                      f"[{colour.get(st, 'white')}]{st}[/]")
    out.print(table)
    owners = Table(title="Owners (projected)")
    for col in ("owner", "score", "multiplier"):
        owners.add_column(col)
    for o in data["owners"]:
        owners.add_row(o["owner"], str(o["score"]), str(o["multiplier"]))
    out.print(owners)


@snapshots_app.command("list")
def snapshots_list(grain: str | None = typer.Option(None, help="day, week, month, quarter or year."),
                   config: Path | None = ConfigOpt) -> None:
    """Closed periods in the ledger with their latest version."""
    settings = load_settings(config)
    table = Table()
    for col in ("grain", "period", "versions"):
        table.add_column(col)
    for g, p, v in list_periods(_redis(settings), _prefix(settings), grain):
        table.add_row(g, p, str(v))
    out.print(table)


@snapshots_app.command("show")
def snapshots_show(period: str = typer.Argument(..., help="Period label: 2024-03-14, 2024-W11, 2024-03, 2024-Q1, 2024"),
                   version: int | None = typer.Option(None, help="A version (default: all)."),
                   config: Path | None = ConfigOpt) -> None:
    """Every version of one period's snapshot (JSON)."""
    settings = load_settings(config)
    versions = read_versions(_redis(settings), _prefix(settings), _grain_of(period), period)
    if version is not None:
        versions = [v for v in versions if v["version"] == version]
    if not versions:
        err.print(f"[red]no snapshot for {period}[/red]")
        raise typer.Exit(1)
    sys.stdout.write(json.dumps(versions, indent=2) + "\n")


@snapshots_app.command("export")
def snapshots_export(period: str = typer.Argument(...),
                     fmt: str = typer.Option("json", "--format", help="json or csv"),
                     config: Path | None = ConfigOpt) -> None:
    """The latest version of a period: JSON, or CSV rows of its KPIs and owners' contributions."""
    settings = load_settings(config)
    snap = _latest(settings, _grain_of(period), period)
    if fmt == "json":
        sys.stdout.write(json.dumps(snap, indent=2) + "\n")
        return
    if fmt != "csv":
        err.print("[red]--format must be json or csv[/red]")
        raise typer.Exit(2)
    buf = io.StringIO()
    w = csvsafe.writer(buf)  # formula-like cells neutralised, every cell quoted
    w.writerow(["period", "version", "hash", "row", "id", "actual", "target", "attainment", "multiplier", "status",
                "weight", "contribution"])
    for k in snap["kpis"]:
        w.writerow([period, snap["version"], snap["hash"], "kpi", k["kpi"], k["actual"], k["target"],
                    k["attainment"], k["multiplier"], k["status"], "", ""])
    for o in snap["owners"]:
        w.writerow([period, snap["version"], snap["hash"], "owner", o["owner"], "", "", o["score"], o["multiplier"],
                    "", "", ""])
        for c in o["contributions"]:
            w.writerow([period, snap["version"], snap["hash"], f"contribution:{o['owner']}", c["kpi"], "", "",
                        c["attainment"], c["multiplier"], c["status"], c["weight"], c["contribution"]])
    sys.stdout.write(buf.getvalue())


@app.command()
def cohorts(grain: str = typer.Option("month", help="week or month: the signup cohorts' and the columns' grain."),
            report: Path | None = typer.Option(None, exists=True, dir_okay=False,
                                               help="Read a backfill report (kpimon backfill --out) instead of the "
                                                    "ledger in Redis."),
            fmt: str = typer.Option("table", "--format", help="table, csv or json"),
            config: Path | None = ConfigOpt) -> None:
    """The signup-cohort table: each cohort's users active in each later week or month (closed periods)."""
    from kpimon.agents.core import cohorts as ct

    if grain not in ("week", "month"):
        err.print("[red]--grain must be week or month[/red]")
        raise typer.Exit(2)
    if fmt not in ("table", "csv", "json"):
        err.print("[red]--format must be table, csv or json[/red]")
        raise typer.Exit(2)
    if report is not None:
        try:
            data = json.loads(report.read_text())
            periods = [(p["period"], p["metrics"]) for p in data["periods"] if p["grain"] == grain]
        except (ValueError, KeyError, TypeError) as exc:
            err.print(f"[red]{report}: not a backfill report ({exc})[/red]")
            raise typer.Exit(2) from None
    else:
        settings = load_settings(config)
        client, prefix = _redis(settings), _prefix(settings)
        periods = [(p, read_versions(client, prefix, g, p)[-1]["metrics"])
                   for g, p, v in list_periods(client, prefix, grain) if v]
    rows = ct.cohort_table(periods, grain)
    if fmt == "json":
        sys.stdout.write(json.dumps(ct.as_json(rows, grain), indent=2) + "\n")
        return
    if fmt == "csv":
        buf = io.StringIO()
        csvsafe.writer(buf).writerows(ct.as_csv_rows(rows))
        sys.stdout.write(buf.getvalue())
        return
    width = max((len(r.active) for r in rows), default=0)
    table = Table(title=f"Signup cohorts by {grain}: users active in each later {grain} (share of the cohort)")
    for col in ("cohort", "users", *(str(k) for k in range(width))):
        table.add_column(col, justify="left" if col == "cohort" else "right")
    for r in rows:
        cells = []
        for k in range(width):
            n = r.active[k] if k < len(r.active) else None
            share = r.rate(k)
            cells.append("" if n is None else f"{n} ({share:.1%})" if share is not None else str(n))
        table.add_row(r.cohort, str(r.size), *cells)
    out.print(table)
    if not rows:
        err.print(f"no {grain} with signups among the closed periods")


@app.command()
def scorecard(owner: str = typer.Option(..., help="Owner id from the KPI spec."),
              period: str = typer.Option(..., help="A closed period, e.g. 2024-03."),
              config: Path | None = ConfigOpt) -> None:
    """An owner's KPIs, contributions and bonus multiplier for a closed period (latest version)."""
    settings = load_settings(config)
    snap = _latest(settings, _grain_of(period), period)
    score = next((o for o in snap["owners"] if o["owner"] == owner), None)
    if score is None:
        err.print(f"[red]owner {owner!r} has no score in {period}[/red]")
        raise typer.Exit(1)
    results = {k["kpi"]: k for k in snap["kpis"]}
    table = Table(title=f"{owner} — {period} (snapshot v{snap['version']}, {snap['hash'][:19]}…)")
    for col in ("KPI", "kind", "weight", "actual", "target", "attainment", "multiplier", "contribution"):
        table.add_column(col)
    for c in score["contributions"]:
        r = results.get(c["kpi"], {})
        table.add_row(c["kpi"], c["kind"], c["weight"], str(r.get("actual")), str(r.get("target")),
                      str(c["attainment"]), str(c["multiplier"]), c["contribution"])
    out.print(table)
    out.print(f"score [bold]{score['score']}[/bold]   bonus multiplier [bold]{score['multiplier']}[/bold]")


@targets_app.command("suggest")
def targets_suggest(kpi: str = typer.Option(..., help="KPI id."),
                    periods: int = typer.Option(3, "--periods", "-n", help="How many closed periods to average."),
                    haircut: float = typer.Option(0.10, help="Taken off the mean (added for lower-is-better)."),
                    seasonal: str | None = typer.Option(None, help="Seasonal reference: scale by this period's "
                                                                      "actual over the mean."),
                    config: Path | None = ConfigOpt) -> None:
    """Propose the next period's target from closed snapshots, as YAML to paste into the KPI spec."""
    from kpimon.agents.core.kpi_targets import suggest_target

    settings = load_settings(config)
    spec = load_kpi_spec(settings)
    if spec is None:
        err.print("[red]no KPI spec configured (kpis: in kpimon.yaml)[/red]")
        raise typer.Exit(2)
    try:
        k = spec.kpi(kpi)
    except KeyError:
        err.print(f"[red]no KPI {kpi!r} in the spec[/red] ({', '.join(x.id for x in spec.kpis)})")
        raise typer.Exit(2) from None
    client = _redis(settings)
    rows: list[tuple[str, str, Any]] = []  # (period, end as RFC 3339, actual), oldest first
    for g, p, _ in list_periods(client, _prefix(settings), str(k.grain)):
        snap = read_versions(client, _prefix(settings), g, p)[-1]
        row = next((r for r in snap["kpis"] if r["kpi"] == kpi), None)
        if row is not None and row["actual"] is not None:
            rows.append((p, snap["end"], row["actual"]))
    if not rows:
        err.print(f"[red]no closed {k.grain} snapshot has a value for {kpi}[/red]")
        raise typer.Exit(1)
    ratio = None
    if seasonal is not None:
        labels = [p for p, _, _ in rows]
        if seasonal not in labels or labels.index(seasonal) == 0:
            err.print(f"[red]seasonal reference {seasonal} needs closed periods before it[/red]")
            raise typer.Exit(1)
        i = labels.index(seasonal)
        base = [Fraction(str(a)) for _, _, a in rows[max(0, i - periods):i]]
        ratio = Fraction(str(rows[i][2])) / (sum(base) / len(base))
    cal = Calendar(settings.timezone)
    following = cal.period_at(parse_instant(rows[-1][1]), k.grain).label
    suggestion = suggest_target([a for _, _, a in rows], n=periods, haircut=str(haircut), seasonal_reference=ratio,
                                direction=k.direction, kpi_id=kpi, label=following)
    sys.stdout.write(suggestion.yaml + ("" if suggestion.yaml.endswith("\n") else "\n"))
