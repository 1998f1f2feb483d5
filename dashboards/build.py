"""kpimon's Grafana dashboards as code (grafana-foundation-sdk).

One typed function per dashboard returns its builder; ``python -m dashboards.build``
renders them to ``dashboards/generated/<uid>.json``, which is committed and
provisioned into Grafana (``dashboards/provisioning/``, docs/dashboards.md).
``python -m dashboards.build --check`` exits 1 when a committed file is stale;
tests/unit/dashboards/test_dashboards.py runs the same check.

Queries follow docs/metrics.md section 7: counters and state gauges are summed
over workers (``sum by (...)``), the watermark takes the ``min``, and the live
KPI gauges are used as they are (only the aggregating worker exports them).
Every panel query is run against a real Prometheus scraping a real worker in
tests/integration/test_dashboard_queries.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, StackingConfig, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

GENERATED = Path(__file__).resolve().parent / "generated"

# Panels use the dashboard's `datasource` variable (type prometheus); the provisioned
# data source (dashboards/provisioning/datasources.yaml) is the default one.
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["kpimon"]
STATUS_COLORS = {"on_track": "green", "at_risk": "yellow", "off_track": "red", "no_data": "text",
                 "no_target": "text"}
# The SDK's panel builders used here: each has id/span/height, but they share no base class with them.
PanelBuilder: TypeAlias = stat.Panel | timeseries.Panel | table.Panel | bargauge.Panel


# ------------------------------------------------------------------ helpers
def query(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
          table_format: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant()
    if table_format:
        q = q.format(PromQueryFormat.TABLE)
    return q


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=v, color=c) for v, c in steps])


def stat_panel(title: str, expr: str, *, unit: str = "short", decimals: int | None = None,
               steps: tuple[tuple[float | None, str], ...] = ((None, "blue"),), description: str = "",
               mappings: list | None = None) -> stat.Panel:
    p = (stat.Panel().title(title).datasource(DS).with_target(query(expr)).unit(unit)
         .graph_mode(cm.BigValueGraphMode.AREA).color_mode(cm.BigValueColorMode.VALUE)
         .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .thresholds(thresholds(*steps)))
    if decimals is not None:
        p = p.decimals(decimals)
    if description:
        p = p.description(description)
    if mappings:
        p = p.mappings(mappings)
    return p


def ts_panel(title: str, *targets: prometheus.Dataquery, unit: str = "short", description: str = "",
             stacked: bool = False, min_zero: bool = True) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).datasource(DS).unit(unit).fill_opacity(10).line_width(1)
         .legend(VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.LIST)
                 .placement(cm.LegendPlacement.BOTTOM)))
    for t in targets:
        p = p.with_target(t)
    if description:
        p = p.description(description)
    if stacked:
        p = p.stacking(StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(40)
    if min_zero:
        p = p.min(0)
    return p


class Layout:
    """Adds rows and panels to a dashboard with stable ids (the SDK's grid placement does the rest)."""

    def __init__(self, dash: dashboard.Dashboard) -> None:
        self.dash = dash
        self._next_id = 1

    def row(self, title: str) -> Layout:
        self.dash.with_row(dashboard.Row(title).id(self._take()))
        return self

    def add(self, panel: PanelBuilder, width: int, height: int = 8) -> Layout:
        self.dash.with_panel(panel.id(self._take()).span(width).height(height))
        return self

    def _take(self) -> int:
        n, self._next_id = self._next_id, self._next_id + 1
        return n


def new_dashboard(uid: str, title: str, description: str) -> dashboard.Dashboard:
    return (dashboard.Dashboard(title).uid(uid).description(description).tags(TAGS).editable()
            .timezone("browser").time("now-24h", "now").refresh("1m")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .annotation(dashboard.AnnotationQuery().name("Annotations & Alerts").built_in(1).type("dashboard")
                        .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                        .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)"))
            .link(dashboard.DashboardLink("kpimon").type(dm.DashboardLinkType.DASHBOARDS).tags(TAGS)
                  .as_dropdown(True).include_vars(False).keep_time(True))
            .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")))


def custom_variable(name: str, label: str, values: list[str], default: str,
                    description: str) -> dashboard.CustomVariable:
    return (dashboard.CustomVariable(name).label(label).description(description).values(",".join(values))
            .current(dm.VariableOption(selected=True, text=default, value=default))
            .options([dm.VariableOption(selected=v == default, text=v, value=v) for v in values]))


# ------------------------------------------------------------------ dashboards
def kpis_vs_targets() -> dashboard.Dashboard:
    """Every KPI of the spec against its target, attainment, status and owner multipliers."""
    dash = new_dashboard(
        "kpimon-kpis", "kpimon — KPIs vs targets",
        "Live KPIs of the open periods (kpimon_kpi_*, kpimon_owner_*), exported by the worker that runs the "
        "aggregation. The period-close snapshots are the figures of record; these are live indicators.",
    ).with_variable(
        dashboard.QueryVariable("kpi").label("KPI").datasource(DS)
        .query("label_values(kpimon_kpi_status, kpi)").multi(True).include_all(True)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        .description("KPI ids from the KPI spec (kpis: in the worker's configuration)")
    )
    sel = '{kpi=~"$kpi"}'
    lay = Layout(dash)
    lay.row("Overview")
    for status, label, color in (("on_track", "on track", "green"), ("at_risk", "at risk", "yellow"),
                                 ("off_track", "off track", "red")):
        lay.add(stat_panel(f"KPIs {label}", f'sum(kpimon_kpi_status{{kpi=~"$kpi", status="{status}"}})',
                           steps=((None, color),), description=f"Number of KPIs whose status is {status}."), 6, 4)
    lay.add(stat_panel("KPIs without data or target",
                       'sum(kpimon_kpi_status{kpi=~"$kpi", status=~"no_data|no_target"})',
                       steps=((None, "text"),)), 6, 4)
    status_table = (
        table.Panel().title("KPI status (open periods)").datasource(DS)
        .with_target(query(f"kpimon_kpi_status{sel} == 1", ref="A", instant=True, table_format=True))
        .with_target(query(f"kpimon_kpi_actual{sel}", ref="B", instant=True, table_format=True))
        .with_target(query(f"kpimon_kpi_target{sel}", ref="C", instant=True, table_format=True))
        .with_target(query(f"kpimon_kpi_attainment_ratio{sel}", ref="D", instant=True, table_format=True))
        .with_target(query(f"kpimon_kpi_projected_attainment_ratio{sel}", ref="E", instant=True,
                           table_format=True))
        .with_target(query(f"kpimon_kpi_expected_progress_ratio{sel}", ref="F", instant=True, table_format=True))
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
            "excludeByName": {"Time": True, "Value #A": True, "__name__": True, "instance": True, "job": True},
            "indexByName": {"kpi": 0, "status": 1, "Value #B": 2, "Value #C": 3, "Value #D": 4, "Value #E": 5,
                            "Value #F": 6},
            "renameByName": {"kpi": "KPI", "status": "Status", "Value #B": "Actual", "Value #C": "Target",
                             "Value #D": "Attainment", "Value #E": "Projected attainment",
                             "Value #F": "Expected progress"},
        }))
        .mappings([dm.ValueMap(options={s: dm.ValueMappingResult(color=c, index=i)
                                        for i, (s, c) in enumerate(STATUS_COLORS.items())})])
        .override_by_regexp("Attainment|Projected attainment|Expected progress", [
            dm.DynamicConfigValue(id_val="unit", value="percentunit")])
        .override_by_name("Status", [
            dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"})])
        .description("One row per KPI: status (on_track, at_risk, off_track, no_data, no_target), value so far, "
                     "target of the open period, attainment so far and projected to the period's end.")
    )
    lay.add(status_table, 16, 10)
    lay.add(bargauge.Panel().title("Projected bonus multiplier by owner").datasource(DS)
            .with_target(query("kpimon_owner_multiplier", "{{owner}}", instant=True))
            .display_mode(cm.BarGaugeDisplayMode.GRADIENT).orientation(cm.VizOrientation.HORIZONTAL)
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)).min(0).decimals(2)
            .thresholds(thresholds((None, "red"), (0.5, "yellow"), (1, "green")))
            .description("Payout curve applied to the owner's projected score (kpimon_owner_multiplier)."),
            8, 10)

    lay.row("Actual vs target")
    lay.add(ts_panel("$kpi: actual vs target",
                     query(f"kpimon_kpi_actual{sel}", "actual", "A"),
                     query(f"kpimon_kpi_target{sel}", "target", "B"),
                     description="Value so far in the open period against the period's target. One panel per "
                                 "selected KPI.")
            .repeat("kpi").repeat_direction("h").max_per_row(3)
            .override_by_name("target", [dm.DynamicConfigValue(id_val="custom.lineStyle",
                                                               value={"fill": "dash", "dash": [10, 10]})]),
            8, 8)

    lay.row("Attainment")
    lay.add(ts_panel("Attainment so far", query(f"kpimon_kpi_attainment_ratio{sel}", "{{kpi}}"),
                     unit="percentunit", description="actual / target (target / actual for lower-is-better KPIs)."),
            8)
    lay.add(ts_panel("Projected attainment at period end",
                     query(f"kpimon_kpi_projected_attainment_ratio{sel}", "{{kpi}}"), unit="percentunit",
                     description="Attainment projected to the end of the period (docs/kpis.md section 3); "
                                 "100 % is on target.")
            .thresholds(thresholds((None, "red"), (0.9, "yellow"), (1, "green"))), 8)
    lay.add(ts_panel("Expected progress", query(f"kpimon_kpi_expected_progress_ratio{sel}", "{{kpi}}"),
                     unit="percentunit", description="Share of the period that should be done by now, shaped by "
                                                     "the KPI's profile."), 8)

    lay.row("Owners")
    lay.add(ts_panel("Owner score", query("kpimon_owner_score", "{{owner}}"), unit="percentunit",
                     description="Weighted credited attainment of each owner in the open period."), 12)
    lay.add(ts_panel("Projected bonus multiplier", query("kpimon_owner_multiplier", "{{owner}}"),
                     description="kpimon_owner_multiplier over time: the multiplier the owner would get if the "
                                 "period ended at its projected attainment."), 12)
    return dash


def lifecycle_aarrr() -> dashboard.Dashboard:
    """Population by lifecycle state, rolling actives, churn warnings, win-backs and the AARRR funnel."""
    dash = (new_dashboard(
        "kpimon-lifecycle", "kpimon — lifecycle & AARRR",
        "Lifecycle population and moves, rolling DAU/WAU/MAU, churn warnings and win-backs, acquisition, "
        "revenue and the open period's values. State gauges and counters are summed over workers.",
    ).with_variable(custom_variable(
        "grain", "Open period", ["day", "week", "month", "quarter", "year"], "month",
        "Grain of the open period shown by kpimon_period_value"))
        .with_variable(custom_variable(
            "warning_state", "Churn warning state", ["silent", "sleeping", "churned"], "sleeping",
            "lifecycle.warning_state of the worker's configuration: entering it is a churn warning"))
        .with_variable(custom_variable(
            "cohort_grain", "Signup cohorts by", ["week", "month"], "month",
            "Grain of the signup cohorts and of the later periods they are followed in")))
    lay = Layout(dash)
    warnings = 'sum(increase(kpimon_lifecycle_transitions_total{to="$warning_state"}[1h]))'

    lay.row("Users")
    for title, window in (("DAU", "1d"), ("WAU", "7d"), ("MAU", "30d")):
        lay.add(stat_panel(title, f'sum(kpimon_active_users{{window="{window}"}})',
                           description=f"Distinct users active within {window} before the watermark."), 4, 5)
    lay.add(stat_panel("Stickiness (DAU / MAU)",
                       'sum(kpimon_active_users{window="1d"}) / sum(kpimon_active_users{window="30d"})',
                       unit="percentunit", decimals=1), 4, 5)
    lay.add(stat_panel("Known users", "sum(kpimon_lifecycle_users)",
                       description="Every user ever seen, in any state (dead users stay)."), 4, 5)
    lay.add(stat_panel("Churn warnings, last hour", warnings, steps=((None, "green"), (20, "orange")),
                       description="Users who entered the warning state in the trailing hour "
                                   "(alert KpimonPreChurnSpike compares this with the same hour of the past "
                                   "7 days)."), 4, 5)
    lay.add(ts_panel("Population by lifecycle state", query("sum by (state) (kpimon_lifecycle_users)", "{{state}}"),
                     stacked=True, description="Users in each state just before the watermark."), 12)
    lay.add(ts_panel("Rolling active users", query("sum by (window) (kpimon_active_users)", "{{window}}"),
                     description="DAU (1d), WAU (7d) and MAU (30d) as of the watermark."), 12)

    lay.row("Churn and win-backs")
    lay.add(ts_panel("Churn warnings per hour (entered $warning_state)", query(warnings, "warnings, trailing 1 h"),
                     description="increase of kpimon_lifecycle_transitions_total{to=<warning state>} over the "
                                 "trailing hour, summed over workers."), 8)
    lay.add(ts_panel("Lifecycle entries per hour",
                     query('sum by (from, to) (increase(kpimon_lifecycle_transitions_total{to!="active"}[1h]))',
                           "{{from}} → {{to}}"),
                     description="Users entering silent, sleeping, churned and dead."), 8)
    lay.add(ts_panel("Win-backs and returns per hour",
                     query('sum by (from) (increase(kpimon_lifecycle_transitions_total'
                           '{to="active", from=~"churned|dead"}[1h]))', "win-back from {{from}}", "A"),
                     query('sum by (from) (increase(kpimon_lifecycle_transitions_total'
                           '{to="active", from=~"silent|sleeping"}[1h]))', "return from {{from}}", "B"),
                     description="Only returns from churned and dead are win-backs."), 8)

    lay.row("Acquisition, revenue, referral (trailing hour)")
    lay.add(ts_panel("Signups per hour by channel",
                     query("sum by (channel) (increase(kpimon_signups_total[1h]))", "{{channel}}"), stacked=True,
                     description="Accepted signup events (a repeated signup of a user counts again; new_users "
                                 "below counts first signups only)."), 8)
    lay.add(ts_panel("Revenue per hour",
                     query("sum(increase(kpimon_revenue_total[1h])) - sum(increase(kpimon_refunds_total[1h]))",
                           "net revenue", "A"),
                     query("sum(increase(kpimon_revenue_total[1h]))", "gross revenue", "B"),
                     query("sum(increase(kpimon_refunds_total[1h]))", "refunds", "C"),
                     min_zero=False, description="Currency units; net = purchases − refunds."), 8)
    lay.add(ts_panel("Orders and invites per hour",
                     query("sum(increase(kpimon_orders_total[1h]))", "orders", "A"),
                     query("sum(increase(kpimon_invites_total[1h]))", "invites", "B")), 8)

    lay.row("Open $grain (AARRR)")
    for title, metric, unit, decimals in (
            ("New users", "new_users", "short", 0), ("Referred signups", "referred_signups", "short", 0),
            ("Active users", "active_users", "short", 0), ("Paying users", "paying_users", "short", 0),
            ("Orders", "orders", "short", 0), ("Net revenue", "revenue", "short", 2),
            ("Invites", "invites", "short", 0), ("Won back", "won_back", "short", 0)):
        lay.add(stat_panel(title, f'sum(kpimon_period_value{{grain="$grain", metric="{metric}"}})', unit=unit,
                           decimals=decimals, description=f"{metric} so far in the open $grain "
                                                          "(kpimon_period_value, summed over workers)."), 3, 5)
    lay.add(table.Panel().title("Open $grain: every value").datasource(DS)
            .with_target(query('sum by (metric) (kpimon_period_value{grain="$grain"})', ref="A", instant=True,
                               table_format=True))
            .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
                "excludeByName": {"Time": True},
                "renameByName": {"metric": "Metric", "Value": "So far"}}))
            .description("Live indicator of the open period; the period report and snapshots are the figures "
                         "of record."), 8, 10)
    lay.add(ts_panel("Open $grain over time",
                     query('sum by (metric) (kpimon_period_value{grain="$grain", '
                           'metric=~"active_users|new_users|paying_users|entered_sleeping|entered_churned"})',
                           "{{metric}}")), 16, 10)

    lay.row("Acquisition efficiency and referral value (open $grain)")
    value = 'sum(kpimon_period_value{{grain="$grain", metric="{}"}})'
    for title, expr, unit, decimals, what in (
            ("First purchases", value.format("first_purchases"), "short", 0,
             "Users whose first ever purchase falls in the open $grain so far."),
            ("Activation so far", f'{value.format("activation_converted")} / '
                                  f'({value.format("activation_eligible")} > 0)', "percentunit", 1,
             "Of the new users whose activation window (activation.window_days) ended in the open $grain so far, "
             "the share who purchased within it. No value while nobody is eligible."),
            ("Referred revenue", value.format("referred_revenue"), "short", 2,
             "Net revenue so far from users whose first signup had a referrer."),
            ("Inviters", value.format("inviters"), "short", 0, "Distinct users who sent an invite so far."),
            ("Invite conversion", f'{value.format("referred_signups")} / ({value.format("invites")} > 0)',
             "percentunit", 1, "Referred signups per invite so far (referred_signups / invites)."),
    ):
        lay.add(stat_panel(title, expr, unit=unit, decimals=decimals,
                           description=what + " Final numbers: the period report (docs/metrics.md)."), 4, 5)

    lay.row("Growth accounting (open $grain)")
    growth = 'sum(kpimon_period_value{{grain="$grain", metric="growth_{}"}})'
    lay.add(ts_panel("Growth accounting so far",
                     query(growth.format("new"), "new", "A"),
                     query(growth.format("resurrected"), "resurrected", "B"),
                     query(growth.format("retained"), "retained", "C"),
                     query("-" + growth.format("dormant"), "dormant (negative)", "D"),
                     min_zero=False,
                     description="Active users of the open $grain by what they did in the previous $grain: new "
                                 "(first activity ever), retained (active then too), resurrected (not active "
                                 "then, active before). Dormant: active then, not yet in this one (it falls as "
                                 "they come back). Final numbers: the period report (docs/metrics.md)."), 16)
    lay.add(stat_panel("Quick ratio so far",
                       f'({growth.format("new")} + {growth.format("resurrected")}) / ({growth.format("dormant")} > 0)',
                       decimals=2, steps=((None, "red"), (1, "green")),
                       description="(new + resurrected) / dormant of the open $grain: above 1 the active base "
                                   "grows. No value while nobody is dormant."), 8)

    lay.row("Retention")

    def by_n(kind: str) -> str:  # one series per N of the settings' retention.days, labelled n="d<N>"
        return f'sum by (n) (kpimon_period_retention_users{{grain="$grain", kind="{kind}"}})'
    lay.add(ts_panel("N-day retention so far (open $grain)", query(f'{by_n("retained")} / ({by_n("eligible")} > 0)',
                                                                   "{{n}}"),
                     unit="percentunit",
                     description="Of the users whose signup day + N falls in the open $grain so far, the share "
                                 "active on that day (retention.d<N>; N from retention.days). No value while nobody "
                                 "is eligible. Final numbers: the period report."), 8)
    cohorts = 'max by (cohort, offset) (kpimon_cohort_active_users{grain="$cohort_grain"})'
    for title, expr, unit, what in (
            ("Signup cohorts: active users", cohorts, "short", "users"),
            ("Signup cohorts: share active",
             f'{cohorts} / ignoring(offset) group_left() max by (cohort) '
             '(kpimon_cohort_active_users{grain="$cohort_grain", offset=~"0+"})', "percentunit", "share")):
        lay.add(table.Panel().title(f"{title} by $cohort_grain").datasource(DS).unit(unit)
                .with_target(query(expr, ref="A", instant=True, table_format=True))
                .with_transformation(dm.DataTransformerConfig(id_val="groupingToMatrix", options={
                    "columnField": "offset", "rowField": "cohort", "valueField": "Value", "emptyValue": "null"}))
                .cell_options(cm.TableColoredBackgroundCellOptions(
                    mode=cm.TableCellBackgroundDisplayMode.GRADIENT))
                .color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.CONTINUOUS_BL_PU))
                .description(f"The triangle: one row per signup cohort (a $cohort_grain), its {what} active in "
                             "each later $cohort_grain (column: how many after the cohort's own; 0 is the "
                             "cohort's size). Latest closed periods, retention.cohort_horizon deep. kpimon "
                             "cohorts prints the whole table."), 8)
    return dash


def operations() -> dashboard.Dashboard:
    """Ingest throughput, rejects, late and duplicate events, watermark lag and the serving layer."""
    dash = new_dashboard(
        "kpimon-operations", "kpimon — operations",
        "Ingest and processing health for on-call: accepted events by type, rejects by reason, late and "
        "duplicate events, watermark lag, and the Redis serving layer.",
    )
    lay = Layout(dash)
    rate = "[$__rate_interval]"
    received = " + ".join(f"sum(rate({m}[5m]))" for m in (
        "kpimon_events_total", "kpimon_events_rejected_total", "kpimon_events_duplicate_total",
        "kpimon_events_late_total"))

    lay.row("Ingest")
    lay.add(stat_panel("Accepted events/s", f"sum(rate(kpimon_events_total{rate}))", unit="ops"), 4, 5)
    lay.add(stat_panel("Rejected ratio (5 m)", f"sum(rate(kpimon_events_rejected_total[5m])) / ({received})",
                       unit="percentunit", decimals=2, steps=((None, "green"), (0.01, "red")),
                       description="Rejected / received (accepted + rejected + duplicate + late). "
                                   "Alert KpimonRejectedEventsHigh fires above 1 % for 10 minutes."), 4, 5)
    lay.add(stat_panel("Watermark lag", "time() - min(kpimon_watermark_timestamp_seconds)", unit="s",
                       steps=((None, "green"), (900, "orange")),
                       description="Wall clock minus the lowest watermark of all workers. With worker.clock: "
                                   "live it stays near lateness (5 m by default)."), 4, 5)
    lay.add(stat_panel("Workers scraped", 'sum(up{job="kpimon"})', description="Scrape targets of job kpimon "
                                                                                "that answered."), 4, 5)
    lay.add(stat_panel("Serving layer up", "min(kpimon_serving_up)", steps=((None, "red"), (1, "green")),
                       mappings=[dm.ValueMap(options={"0": dm.ValueMappingResult(text="down", color="red", index=0),
                                                      "1": dm.ValueMappingResult(text="up", color="green",
                                                                                 index=1)})],
                       description="0 when any worker cannot write to Redis (redis.enabled: true only)."), 4, 5)
    lay.add(stat_panel("Serving backlog (users)", "sum(kpimon_serving_backlog_users)",
                       steps=((None, "green"), (10000, "orange"))), 4, 5)
    lay.add(ts_panel("Accepted events/s by type",
                     query(f"sum by (type) (rate(kpimon_events_total{rate}))", "{{type}}"), unit="ops",
                     stacked=True), 12)
    lay.add(ts_panel("Rejected events/s by reason",
                     query(f"sum by (reason) (rate(kpimon_events_rejected_total{rate}))", "{{reason}}"),
                     unit="ops", description="Events sent to the dead-letter topic kpimon.events.dlq."), 12)
    lay.add(ts_panel("Late and duplicate events/s",
                     query(f"sum(rate(kpimon_events_late_total{rate}))", "late", "A"),
                     query(f"sum(rate(kpimon_events_duplicate_total{rate}))", "duplicate", "B"), unit="ops",
                     description="Late events go to kpimon.events.late (and the restatement ledger); "
                                 "duplicates are dropped."), 12)
    lay.add(ts_panel("Watermark lag per worker", query("time() - kpimon_watermark_timestamp_seconds",
                                                       "{{instance}}"), unit="s",
                     description="Wall clock minus each worker's lowest partition watermark."), 12)
    lay.add(ts_panel("Loop failures, trailing hour",
                     query("sum by (loop) (increase(kpimon_loop_crashes_total[1h]))", "{{loop}}"),
                     description="A failed ingest, aggregate, restate or faust loop stops its worker with exit "
                                 "code 1 and /healthz answers 503 meanwhile (docs/operations.md). The process "
                                 "exits within seconds, so a scrape may miss the count: watch restarts too."), 12)

    lay.row("Serving layer (Redis)")
    lay.add(ts_panel("Serving layer up per worker", query("kpimon_serving_up", "{{instance}}")).max(1), 8)
    lay.add(ts_panel("Backlog per worker (users)", query("kpimon_serving_backlog_users", "{{instance}}")), 8)
    lay.add(ts_panel("Writes/s by result",
                     query(f"sum by (result) (rate(kpimon_serving_writes_total{rate}))", "{{result}}"),
                     unit="ops", description="applied, repeat, gap (Redis lost data), error (round trip "
                                             "failed, retried)."), 8)
    lay.add(ts_panel("Write latency",
                     query(f"histogram_quantile(0.5, sum by (le) (rate(kpimon_serving_write_seconds_bucket{rate})))",
                           "p50", "A"),
                     query(f"histogram_quantile(0.99, sum by (le) (rate(kpimon_serving_write_seconds_bucket{rate})))",
                           "p99", "B"), unit="s"), 12)
    lay.add(ts_panel("Rebuilds, trailing hour", query("sum(increase(kpimon_serving_rebuilds_total[1h]))", "rebuilds"),
                     description="Partitions rebuilt from the state log because Redis lost data."), 12)
    return dash


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "kpimon-kpis": kpis_vs_targets,
    "kpimon-lifecycle": lifecycle_aarrr,
    "kpimon-operations": operations,
}


# ------------------------------------------------------------------ rendering
def render(builder: dashboard.Dashboard) -> str:
    return JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False).encode(builder.build()) + "\n"


def generate() -> dict[str, str]:
    """File name → JSON text of every dashboard."""
    return {f"{uid}.json": render(fn()) for uid, fn in DASHBOARDS.items()}


def stale(out_dir: Path = GENERATED) -> list[str]:
    """Files in ``out_dir`` that differ from, are missing for, or are not produced by :func:`generate`."""
    want = generate()
    have = {p.name for p in out_dir.glob("*.json")} if out_dir.is_dir() else set()
    diff = [n for n, text in want.items() if n not in have or (out_dir / n).read_text(encoding="utf-8") != text]
    return sorted(diff + [n for n in have - set(want)])


def write(out_dir: Path = GENERATED) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    want = generate()
    for extra in set(p.name for p in out_dir.glob("*.json")) - set(want):
        (out_dir / extra).unlink()
    paths = []
    for name, text in want.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboards.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=GENERATED, help="output folder (default: dashboards/generated)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are stale")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale(args.out)
        if bad:
            print(f"stale: {', '.join(bad)}; run python -m dashboards.build", file=sys.stderr)
            return 1
        return 0
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
