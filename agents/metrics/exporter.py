"""Prometheus metrics, created in one place.

* Counters are per worker process and monotonic; they are bumped once per batch
  with pre-bound label children (label values come from allow-lists, never
  from user ids).
* Gauges derived from state (population, rolling actives, open-period values,
  watermark) are computed at scrape time by :class:`StateCollector` from the
  engines of the partitions this worker owns, so summing a series over workers
  gives the true total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kpimon.agents.core.batch import Tally
from kpimon.agents.core.engine import WINDOW_NAMES, PartitionEngine
from kpimon.agents.core.lifecycle import STATES
from kpimon.agents.core.metrics import ADDITIVE, DISTINCT, LATER, PeriodMetrics
from kpimon.streams.events import Reason

PERIOD_METRICS = tuple(m for m in (*DISTINCT, *ADDITIVE) if m not in ("won_back_churned", "won_back_dead")) + (
    "won_back",
)
# Growth accounting of the open period so far, as metric="growth_<key>" (absent while a period's growth is
# unknown, see PeriodMetrics.growth).
GROWTH_GAUGES = ("new", "retained", "resurrected", "dormant")
MONEY_METRICS = {"revenue", "refunds", "referred_revenue"}


class KpimonMetrics:
    def __init__(self, registry: CollectorRegistry, event_types: Iterable[str], channels: Iterable[str], decimals: int):
        self.registry = registry
        self._unit = 10**decimals
        events = Counter("kpimon_events", "Accepted events by type", ["type"], registry=registry)
        self.events = {t: events.labels(t) for t in (*event_types, "other")}
        rejected = Counter("kpimon_events_rejected", "Events sent to the dead-letter topic, by reason", ["reason"],
                           registry=registry)
        self.rejected = {r.value: rejected.labels(r.value) for r in Reason}
        self.duplicates = Counter("kpimon_events_duplicate", "Events refused as duplicates of an event_id",
                                  registry=registry)
        self.late = Counter("kpimon_events_late", "Events refused as late (below the watermark)", registry=registry)
        signups = Counter("kpimon_signups", "Signup events by acquisition channel", ["channel"], registry=registry)
        self.signups = {c: signups.labels(c) for c in (*channels, "other", "unknown")}
        self.revenue = Counter("kpimon_revenue", "Purchase amounts in currency units", registry=registry)
        self.refunds = Counter("kpimon_refunds", "Refund amounts in currency units", registry=registry)
        self.orders = Counter("kpimon_orders", "Purchase events", registry=registry)
        self.invites = Counter("kpimon_invites", "Invite events", registry=registry)
        transitions = Counter("kpimon_lifecycle_transitions", "Lifecycle transitions (win-backs have to=active)",
                              ["from", "to"], registry=registry)
        self.transitions = {
            (i, j): transitions.labels(STATES[i], STATES[j])
            for i in range(len(STATES))
            for j in range(len(STATES))
            if j == i + 1 or (j == 0 and i > 0)
        }

    def observe(self, tally: Tally) -> None:
        for t, n in tally.types.items():
            (self.events.get(t) or self.events["other"]).inc(n)
        for ch, n in tally.signups.items():
            (self.signups.get(ch) or self.signups["other"]).inc(n)
        for reason, n in tally.rejected.items():
            self.rejected[reason].inc(n)
        if tally.duplicates:
            self.duplicates.inc(tally.duplicates)
        if tally.late:
            self.late.inc(tally.late)
        if tally.orders:
            self.orders.inc(tally.orders)
        if tally.invites:
            self.invites.inc(tally.invites)
        if tally.gross:
            self.revenue.inc(tally.gross / self._unit)
        if tally.refunds:
            self.refunds.inc(tally.refunds / self._unit)

    def observe_transitions(self, transitions: dict[tuple[int, int], int]) -> None:
        for key, n in transitions.items():
            self.transitions[key].inc(n)


class StateCollector(Collector):
    """Scrape-time gauges from the engines this worker owns."""

    def __init__(self, engines: Callable[[], Iterable[PartitionEngine]], decimals: int) -> None:
        self._engines = engines
        self._unit = 10**decimals

    def describe(self):
        return []

    def collect(self):
        engines = [e for e in self._engines() if e.cursor is not None]
        yield _summed("kpimon_lifecycle_users", "Users per lifecycle state as of the watermark", "state", STATES,
                      [e.population() for e in engines])
        yield _summed("kpimon_active_users", "Distinct users active within the rolling window", "window",
                      WINDOW_NAMES, [e.active_in_windows() for e in engines])

        values, retention = self._period_values(engines)
        yield values
        yield retention

        wm = GaugeMetricFamily("kpimon_watermark_timestamp_seconds",
                               "Lowest event-time watermark of this worker's partitions", labels=[])
        if engines:
            wm.add_metric([], min(e.wm for e in engines) / 1000)
        yield wm

    def _period_values(self, engines: list[PartitionEngine]) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        fam = GaugeMetricFamily("kpimon_period_value",
                                "Value so far of the open calendar period of each grain (money in currency units)",
                                labels=["metric", "grain"])
        ret = GaugeMetricFamily("kpimon_period_retention_users",
                                "N-day retention of the open period so far: users eligible (signup day + N in the "
                                "period) and retained (active on that day)", labels=["grain", "n", "kind"])
        # The open period of a grain is the latest one among this worker's partitions, merged over them.
        latest: dict[str, tuple[int, PeriodMetrics]] = {}
        for e in engines:
            for period, m in e.open_metrics():
                cur = latest.get(period.grain)
                if cur is None or period.start_ms > cur[0]:
                    latest[period.grain] = (period.start_ms, m)
                elif period.start_ms == cur[0]:
                    latest[period.grain] = (cur[0], cur[1].merge(m))
        for grain, (_, m) in latest.items():
            values = {name: getattr(m, name) for name in (*DISTINCT, *ADDITIVE)}
            values["won_back"] = m.won_back_churned + m.won_back_dead
            for name in PERIOD_METRICS:
                v = values[name]
                fam.add_metric([name, str(grain)], v / self._unit if name in MONEY_METRICS else v)
            if m.growth:  # known only if every partition knows it (PeriodMetrics.merge)
                growth = m.growth_result()
                for key in GROWTH_GAUGES:
                    fam.add_metric([f"growth_{key}", str(grain)], growth[key])
            for name in LATER:  # unknown (None) in a period open across an upgrade
                v = getattr(m, name)
                if v is not None:
                    fam.add_metric([name, str(grain)], v / self._unit if name in MONEY_METRICS else v)
            for _, (eligible, converted) in (m.activation or {}).items():
                fam.add_metric(["activation_eligible", str(grain)], eligible)
                fam.add_metric(["activation_converted", str(grain)], converted)
            # For the N every partition knows (PeriodMetrics.retention); N from the settings' retention.days.
            for n, (eligible, retained) in sorted((m.retention or {}).items()):
                ret.add_metric([str(grain), f"d{n}", "eligible"], eligible)
                ret.add_metric([str(grain), f"d{n}", "retained"], retained)
        return fam, ret


def _summed(name: str, doc: str, label: str, values: tuple[str, ...], rows: list[list[int]]) -> GaugeMetricFamily:
    """One gauge per label value, summed over this worker's partitions."""
    fam = GaugeMetricFamily(name, doc, labels=[label])
    for i, value in enumerate(values):
        fam.add_metric([value], sum(row[i] for row in rows))
    return fam


def new_registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=False)
