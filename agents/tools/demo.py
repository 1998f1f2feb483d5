"""``kpimon demo``: embedded broker + real worker + simulated live traffic, with a live summary.

1. Start the embedded Tansu broker and create the topics.
2. Write a worker config (live clock, the demo's compressed lifecycle
   thresholds from ``config/demo.yaml`` unless a config is given) and run the
   real worker (``kpimon worker``) as a child process; its ``/metrics`` is on
   ``127.0.0.1:web_port``.  Wait until it owns every partition.
3. Run :class:`agents.simulator.Simulator` in real time: events carry the wall
   clock as ``ts``; one simulated day lasts a few seconds (chosen so that the
   model emits about ``rate`` events/s).  Produce them keyed by ``user_id``,
   with about 0.5 % bad lines (dead-letter counter), 0.3 % duplicates and
   0.2 % late events mixed in.
4. Every 2 s scrape ``/metrics`` and show a summary (``rich.live`` on a
   terminal, one status line per refresh otherwise).
5. On Ctrl-C, SIGTERM or after ``duration`` seconds: stop the producer, the
   worker, then the broker, and return the last scraped figures.

If the worker dies, the tail of its log is printed and :class:`DemoError`
(a ``SystemExit`` with status 1) is raised.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from kpimon.agents.core.lifecycle import STATES
from kpimon.agents.tools.backfill import spawn_worker, stop_worker, worker_settings, write_config
from kpimon.agents.tools.datasets import bad_line
from kpimon.agents.tools.simulator import Simulator, time_scale_for
from kpimon.config.settings import DEFAULT_PATH, Settings, load
from kpimon.errors import KpimonError

DEMO_CONFIG = DEFAULT_PATH.with_name("demo.yaml")  # kpimon/config/demo.yaml, next to the packaged defaults
WARMUP_DAYS = 120.0  # simulated days before the demo starts: an established user base
BAD_SHARE = 0.005
DUPLICATE_SHARE = 0.003
LATE_SHARE = 0.002
REFRESH_S = 2.0
TICK_S = 0.1
READY_TIMEOUT_S = 90.0
PERIOD_ROWS = ("new_users", "active_users", "paying_users", "orders", "revenue", "refunds", "invites",
               "referred_signups", "entered_silent", "entered_sleeping", "entered_churned", "entered_dead",
               "won_back")


class DemoError(KpimonError):
    """The demo cannot go on (the worker died, the port is taken...): exit status 1.

    The command prints the message as one line (after the worker log tail, if any).
    """

    @property
    def message(self) -> str:
        return str(self)


class _Stop(Exception):
    """SIGTERM received."""


# ---------------------------------------------------------------- /metrics
def scrape(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """Fetch and parse a kpimon ``/metrics`` page into plain figures."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    return parse_metrics(text)


# Counters that are one figure each: metric name -> figure.
_FIGURES = {"kpimon_events_duplicate_total": "duplicates", "kpimon_events_late_total": "late",
            "kpimon_orders_total": "orders", "kpimon_revenue_total": "revenue",
            "kpimon_refunds_total": "refunds", "kpimon_invites_total": "invites"}


def parse_metrics(text: str) -> dict[str, Any]:
    fig: dict[str, Any] = {
        "accepted": 0.0, "events_by_type": {}, "rejected": 0.0, "rejected_by_reason": {}, "duplicates": 0.0,
        "late": 0.0, "signups_by_channel": {}, "orders": 0.0, "revenue": 0.0, "refunds": 0.0, "invites": 0.0,
        "transitions": {}, "population": {s: 0.0 for s in STATES}, "active_users": {}, "period": {},
        "watermark": None,
    }
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "kpimon_events_total":
                fig["accepted"] += value
                fig["events_by_type"][labels["type"]] = value
            elif name == "kpimon_events_rejected_total":
                fig["rejected"] += value
                fig["rejected_by_reason"][labels["reason"]] = value
            elif name in _FIGURES:
                fig[_FIGURES[name]] = value
            elif name == "kpimon_signups_total":
                fig["signups_by_channel"][labels["channel"]] = value
            elif name == "kpimon_lifecycle_transitions_total":
                fig["transitions"][f"{labels['from']}->{labels['to']}"] = value
            elif name == "kpimon_lifecycle_users":
                fig["population"][labels["state"]] = value
            elif name == "kpimon_active_users":
                fig["active_users"][labels["window"]] = value
            elif name == "kpimon_period_value":
                fig["period"].setdefault(labels["grain"], {})[labels["metric"]] = value
            elif name == "kpimon_watermark_timestamp_seconds":
                fig["watermark"] = value
    return fig


def _get_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return orjson.loads(resp.read())


# ---------------------------------------------------------------- rendering
def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _money(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"


def render(fig: dict[str, Any] | None, info: dict[str, Any]) -> Group:
    head = Text.assemble(
        ("kpimon demo", "bold"), f"  /metrics: {info['url']}   elapsed {info['elapsed']:.0f}s   "
        f"1 simulated day = {info['sim_day_s']:.1f}s   produced {info['produced']:,} "
        f"({info['produced_rate']:.0f}/s; bad {info['bad']}, dup {info['dup']}, late {info['late']})")
    if fig is None:
        return Group(head, Text("waiting for the first scrape of /metrics ...", style="dim"))

    ev = Table(title="events", show_header=False, box=None, pad_edge=False)
    ev.add_row("processed/s", f"{info['events_per_s']:.0f}")
    ev.add_row("accepted", _n(fig["accepted"]))
    ev.add_row("rejected (DLQ)", _n(fig["rejected"]))
    for reason, v in sorted(fig["rejected_by_reason"].items()):
        if v:
            ev.add_row(f"  {reason}", _n(v))
    ev.add_row("late", _n(fig["late"]))
    ev.add_row("duplicates", _n(fig["duplicates"]))

    pop = Table(title="population", show_header=False, box=None, pad_edge=False)
    total = sum(fig["population"].values()) or 1
    for state in STATES:
        v = fig["population"].get(state, 0)
        pop.add_row(state, _n(v), "█" * int(round(12 * v / total)))
    act = fig["active_users"]
    pop.add_row("DAU/WAU/MAU", f"{_n(act.get('1d'))}/{_n(act.get('7d'))}/{_n(act.get('30d'))}", "")

    tr = Table(title="transitions", show_header=False, box=None, pad_edge=False)
    for key, v in fig["transitions"].items():
        if v:
            tr.add_row(key.replace("->", " → "), _n(v))
    if not tr.row_count:
        tr.add_row("(none yet)", "")

    money = Table(title="growth & money", show_header=False, box=None, pad_edge=False)
    money.add_row("orders", _n(fig["orders"]))
    money.add_row("revenue", _money(fig["revenue"]))
    money.add_row("refunds", _money(fig["refunds"]))
    money.add_row("invites", _n(fig["invites"]))
    for ch, v in sorted(fig["signups_by_channel"].items(), key=lambda kv: -kv[1]):
        if v:
            money.add_row(f"signups {ch}", _n(v))

    day = fig["period"].get("day", {})
    today = Table(title="today (open day)", show_header=False, box=None, pad_edge=False)
    for name in PERIOD_ROWS:
        if name in day:
            today.add_row(name, _money(day[name]) if name in ("revenue", "refunds") else _n(day[name]))

    return Group(head, Rule(style="dim"), Columns([ev, pop, tr, money, today], padding=(1, 4)))


def status_line(fig: dict[str, Any] | None, info: dict[str, Any]) -> str:
    if fig is None:
        return f"[{info['elapsed']:.0f}s] produced {info['produced']:,}; waiting for /metrics"
    p = fig["population"]
    act = fig["active_users"]
    return (f"[{info['elapsed']:.0f}s] {info['events_per_s']:.0f} ev/s  accepted {_n(fig['accepted'])}  "
            f"rejected {_n(fig['rejected'])}  late {_n(fig['late'])}  dup {_n(fig['duplicates'])}  | "
            + " ".join(f"{s} {_n(p.get(s))}" for s in STATES)
            + f" | DAU/WAU/MAU {_n(act.get('1d'))}/{_n(act.get('7d'))}/{_n(act.get('30d'))}"
            f" | revenue {_money(fig['revenue'])}")


# ---------------------------------------------------------------- the run
@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """Turn SIGTERM into an exception in the main thread so that cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Stop()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _log_tail(path: str, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no worker log)"


def _fail(console: Console, message: str, log_path: str) -> DemoError:
    console.print("--- worker log tail ---", style="dim")
    console.print(_log_tail(log_path), markup=False, highlight=False)
    return DemoError(f"demo failed: {message}")


def _wait_ready(worker: Any, base_url: str, partitions: int, log_path: str, console: Console) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if worker.poll() is not None:
            raise _fail(console, f"the worker exited during startup (status {worker.returncode})", log_path)
        try:
            health = _get_json(f"{base_url}/healthz")
            if len(health.get("partitions", ())) >= partitions:
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise _fail(console, f"the worker did not own all {partitions} partitions within "
                                 f"{READY_TIMEOUT_S:.0f}s", log_path)
        time.sleep(0.25)


def run_demo(settings: Settings | None = None, duration: float | None = None, rate: float = 200.0,
             users: int = 2000, web_port: int | None = None, console: Console | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the last scraped figures.

    ``settings``: default ``config/demo.yaml`` with the environment overrides;
    ``web_port``: default ``settings.worker.web_port``."""
    from kpimon.agents.runtime.ports import LOOPBACK, port_open
    from kpimon.agents.runtime.tansu import TansuBroker
    from kpimon.streams import admin
    from kpimon.streams.topics import Topics

    console = console or Console(stderr=True)
    if settings is None:
        settings = load(DEMO_CONFIG)
    if web_port is None:
        web_port = settings.worker.web_port
    if rate <= 0 or users <= 0:
        raise DemoError("demo: --rate and --users must be positive")
    if port_open(LOOPBACK, web_port):
        raise DemoError(f"demo failed: port {web_port} on {LOOPBACK} is in use (choose --web-port)")

    time_scale = time_scale_for(rate, users, seed=seed, warmup_days=WARMUP_DAYS)
    sim_day_s = 86_400 / time_scale
    base_url = f"http://{LOOPBACK}:{web_port}"
    metrics_url = f"{base_url}/metrics"
    partitions = settings.kafka.partitions
    prefix = settings.kafka.topic_prefix
    topics = Topics(prefix, settings.worker.app_id)
    started = time.monotonic()
    figures: dict[str, Any] | None = None
    info: dict[str, Any] = {"url": metrics_url, "elapsed": 0.0, "sim_day_s": sim_day_s, "produced": 0,
                            "produced_rate": 0.0, "bad": 0, "dup": 0, "late": 0, "events_per_s": 0.0}

    with ExitStack() as stack:
        stack.enter_context(_sigterm_stops())
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kpimon-demo-"))
        log_path = os.path.join(tmp, "worker.log")
        try:
            broker = stack.enter_context(TansuBroker())
            bootstrap = broker.bootstrap
            console.print(f"embedded broker on {bootstrap}")
            admin.ensure_topics(bootstrap, topics, partitions)
            data = worker_settings(settings, broker=f"kafka://{bootstrap}", prefix=prefix, partitions=partitions,
                                   web_port=web_port, state_dir=os.path.join(tmp, "state"), clock="live")
            data["worker"]["web_host"] = LOOPBACK
            worker = spawn_worker(write_config(data, tmp), log_path)
            stack.callback(stop_worker, worker)  # runs before the broker stops
            console.print(f"worker pid {worker.pid} starting; /metrics at [bold]{metrics_url}[/bold]")
            _wait_ready(worker, base_url, partitions, log_path, console)
            producer = admin.producer(bootstrap)
            stack.callback(producer.close, 5)
            lc = settings.lifecycle
            console.print(
                f"worker ready ({partitions} partitions). Simulating {users} users at ~{rate:.0f} events/s, "
                f"1 simulated day = {sim_day_s:.1f}s; lifecycle after {lc.silent_after / 1000:g}s / "
                f"{lc.sleeping_after / 1000:g}s / {lc.churned_after / 1000:g}s / {lc.dead_after / 1000:g}s "
                "of inactivity (silent/sleeping/churned/dead). "
                + ("Ctrl-C stops." if duration is None else f"Stopping after {duration:g}s (Ctrl-C stops earlier)."))

            sim = Simulator(seed, users=users, time_scale=time_scale, warmup_days=WARMUP_DAYS)
            side = random.Random(seed * 31 + 7)
            recent: list[tuple[bytes, bytes]] = []
            topic = topics.events
            send = producer.send
            t_start = time.monotonic()
            last_ms = int(time.time() * 1000)
            next_refresh = t_start
            prev: tuple[float, float] | None = None  # (monotonic, accepted+rejected+dup+late)
            terminal = console.is_terminal
            live = Live(render(None, info), console=console, auto_refresh=False) if terminal else None
            if live is not None:
                stack.enter_context(live)
            try:
                while True:
                    now_mono = time.monotonic()
                    if duration is not None and now_mono - t_start >= duration:
                        break
                    if worker.poll() is not None:
                        raise _fail(console, f"the worker exited (status {worker.returncode})", log_path)
                    now_ms = int(time.time() * 1000)
                    for ev in sim.raw_between(last_ms, now_ms):
                        line = sim.to_line(ev)
                        key = ev[2].uid.encode()
                        send(topic, value=line, key=key)
                        info["produced"] += 1
                        recent.append((key, line))
                        if len(recent) > 500:
                            del recent[:250]
                        r = side.random()
                        if r < BAD_SHARE:
                            info["bad"] += 1
                            send(topic, value=bad_line(side, info["bad"], ev[2].uid, now_ms, seed), key=key)
                        elif r < BAD_SHARE + DUPLICATE_SHARE:
                            info["dup"] += 1
                            k, v = recent[int(side.random() * len(recent))]
                            send(topic, value=v, key=k)
                        elif r < BAD_SHARE + DUPLICATE_SHARE + LATE_SHARE:
                            info["late"] += 1
                            late = {"event_id": f"{seed}-late-{info['late']}", "user_id": ev[2].uid,
                                    "type": "page_view", "ts": now_ms - 10 * settings.lateness - 10_000}
                            send(topic, value=orjson.dumps(late), key=key)
                    last_ms = now_ms
                    if now_mono >= next_refresh:
                        next_refresh = now_mono + REFRESH_S
                        info["elapsed"] = now_mono - t_start
                        info["produced_rate"] = info["produced"] / max(info["elapsed"], 1e-3)
                        try:
                            fig = scrape(metrics_url)
                        except (OSError, ValueError):
                            fig = None
                        if fig is not None:
                            seen = fig["accepted"] + fig["rejected"] + fig["duplicates"] + fig["late"]
                            if prev is not None and now_mono > prev[0]:
                                info["events_per_s"] = (seen - prev[1]) / (now_mono - prev[0])
                            prev = (now_mono, seen)
                            figures = fig
                        if live is not None:
                            live.update(render(figures, info), refresh=True)
                        else:
                            console.print(status_line(figures, info), markup=False, highlight=False)
                    time.sleep(max(0.0, TICK_S - (time.monotonic() - now_mono)))
            except (KeyboardInterrupt, _Stop):
                console.print("stopping ...")
            producer.flush(5)
            # one last look, once the worker has had a moment for the tail
            time.sleep(min(1.0, REFRESH_S))
            info["elapsed"] = time.monotonic() - t_start
            info["produced_rate"] = info["produced"] / max(info["elapsed"], 1e-3)
            try:
                figures = scrape(metrics_url)
            except (OSError, ValueError):
                pass
            if live is not None:
                live.update(render(figures, info), refresh=True)
            else:
                console.print(render(figures, info))
        except (KeyboardInterrupt, _Stop):
            console.print("stopped during startup")
    console.print(f"demo stopped after {time.monotonic() - started:.0f}s (worker and broker stopped)")
    result = dict(figures or {})
    result.update(metrics_url=metrics_url, elapsed_s=info["elapsed"], time_scale=time_scale, sim_day_s=sim_day_s,
                  produced=info["produced"], produced_bad=info["bad"], produced_duplicates=info["dup"],
                  produced_late=info["late"], events_per_s=info["events_per_s"], scraped=figures is not None)
    return result
