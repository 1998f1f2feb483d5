"""The metric catalogue KPIs are written against.  Pure.

This module owns the names of the numbers in a per-period metrics dict
(:meth:`agents.core.metrics.PeriodMetrics.result`): the scalar, nested and
per-channel metric paths, which of them are money and which add up over time
(and so project linearly), the check that a name used in a KPI spec is a known
metric (:func:`metric_name_problem`, used by :mod:`config.kpi_loading`), and
the exact look-up of a metric path in a metrics dict (:func:`lookup`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

from kpimon.agents.core.formula import PREV, to_fraction
from kpimon.agents.core.lifecycle import STATES
from kpimon.agents.core.metrics import ACTIVATION_KEYS, GROWTH_KEYS

__all__ = [
    "ADDITIVE_METRICS",
    "CHANNEL_SPLIT",
    "MONEY_METRICS",
    "NESTED_METRICS",
    "RESERVED_CHANNELS",
    "RETENTION_KEYS",
    "INPUTS",
    "SCALAR_METRICS",
    "is_additive",
    "lookup",
    "metric_name_problem",
]

#: Top-level numbers of ``PeriodMetrics.result()``.
SCALAR_METRICS: tuple[str, ...] = (
    "new_users", "active_users", "orders", "paying_users", "revenue", "refunds", "invites",
    "referred_signups", "entered_silent", "entered_sleeping", "entered_churned", "entered_dead",
    "churn_warnings", "churned", "won_back", "first_purchases", "referred_revenue", "inviters",
)
#: Nested numbers: ``<group>.<key>``.
NESTED_METRICS: dict[str, tuple[str, ...]] = {
    "population": tuple(STATES),
    "won_back_by_depth": ("churned", "dead"),
    "growth": GROWTH_KEYS,
    "activation": ACTIVATION_KEYS,
}
#: Metrics that are split by acquisition channel, and where the split lives.
CHANNEL_SPLIT: dict[str, str] = {"new_users": "new_users_by_channel"}
#: Flows that add up over time (a month is the sum of its days): projected linearly.
ADDITIVE_METRICS: frozenset[str] = frozenset({
    "new_users", "orders", "revenue", "refunds", "invites", "referred_signups", "entered_silent",
    "entered_sleeping", "entered_churned", "entered_dead", "churn_warnings", "churned", "won_back",
    "won_back_by_depth.churned", "won_back_by_depth.dead", "growth.new", "first_purchases",
    "activation.eligible", "activation.converted", "referred_revenue",
})
#: Money amounts (decimal strings in the metrics dict).
MONEY_METRICS: frozenset[str] = frozenset({"revenue", "refunds", "referred_revenue"})
RESERVED_CHANNELS = ("other", "unknown")
#: N-day retention: ``retention.d<N>.<key>`` for the N of the settings' ``retention.days``; the counts add up.
RETENTION_KEYS = ("eligible", "retained", "rate")
#: Period inputs of the KPI spec (``KpiSpec.inputs``), which the evaluation puts under this key of the metrics.
INPUTS = "inputs"
_RETENTION = re.compile(r"d([1-9][0-9]{0,2})\.([a-z]+)")


def _metric_list() -> str:
    nested = [f"{g}.<{'|'.join(keys)}>" for g, keys in NESTED_METRICS.items()]
    nested.append(f"retention.d<N>.<{'|'.join(RETENTION_KEYS)}>")
    split = [f"{v}.<channel>" for v in CHANNEL_SPLIT.values()]
    return ", ".join([*SCALAR_METRICS, *nested, *split])


def metric_name_problem(name: str, channels: Sequence[str] | None = None, *, allow_prev: bool = True,
                        retention_days: Sequence[int] | None = None) -> str | None:
    """``None`` if ``name`` is a known metric path (optionally ``prev.``-prefixed), else the fault.

    ``channels``: the allowed channel labels (``Settings.channels``); ``other`` and
    ``unknown`` are always allowed.  ``None`` accepts any channel label.  ``retention_days``: the N of
    ``retention.d<N>`` (``Settings.retention.days``); ``None`` accepts any.
    """
    path = name
    if path.startswith(PREV):
        if not allow_prev:
            return f"{name!r}: prev. is only allowed in a formula"
        path = path[len(PREV):]
        if path.startswith(PREV):
            return f"{name!r}: prev. can only be used once"
    if path in SCALAR_METRICS:
        return None
    group, _, key = path.partition(".")
    if group == INPUTS:
        if name.startswith(PREV):
            return f"{name!r}: inputs are given per period; prev. cannot be used with them"
        if key.count(".") != 1:
            return f"unknown metric {name!r}: write inputs.<name>.<key>"
        return None  # which inputs exist is the spec's business (config.kpi_loading)
    if group == "retention":
        m = _RETENTION.fullmatch(key)
        if m is None or m.group(2) not in RETENTION_KEYS:
            return f"unknown metric {name!r}: write retention.d<N>.<{'|'.join(RETENTION_KEYS)}>"
        if retention_days is not None and int(m.group(1)) not in retention_days:
            return (f"{name!r}: {m.group(1)}-day retention is not computed (retention.days in the settings: "
                    f"{', '.join(map(str, retention_days))})")
        return None
    if group in NESTED_METRICS and key:
        if key in NESTED_METRICS[group]:
            return None
        return f"unknown metric {name!r}: {group} has {', '.join(NESTED_METRICS[group])}"
    if group in CHANNEL_SPLIT.values() and key:
        if "." in key:
            return f"unknown metric {name!r}"
        if channels is not None and key not in channels and key not in RESERVED_CHANNELS:
            return f"unknown channel {key!r} in {name!r} (channels: {', '.join([*channels, *RESERVED_CHANNELS])})"
        return None
    return f"unknown metric {name!r} (metrics: {_metric_list()})"


def is_additive(name: str) -> bool:
    if name.startswith(PREV):
        return False
    group = name.split(".", 1)[0]
    return name in ADDITIVE_METRICS or group in CHANNEL_SPLIT.values() or (
        group == "retention" and not name.endswith(".rate"))


def lookup(metrics: Mapping[str, Any], path: str) -> Fraction | None:
    """The exact value of a metric path in a ``PeriodMetrics.result()`` dict, ``None`` if it has no value.

    A channel missing from ``new_users_by_channel`` is 0 (the report omits zeros).  A ``None`` in the dict (a
    quick ratio without dormant users, growth of a period open across an upgrade) has no value: a formula
    reading it has none either.  A missing key elsewhere raises ``KeyError`` naming the path.
    """
    group, _, key = path.partition(".")
    if key and group in CHANNEL_SPLIT.values():
        value = metrics.get(group, {}).get(key, 0)
    elif group == INPUTS:
        name, _, field = key.partition(".")
        value = metrics.get(INPUTS, {}).get(name, {}).get(field)  # no value for this period: none
    elif group == "retention":
        n, _, field = key.partition(".")
        counts = metrics.get(group, {}).get(n)  # absent: not known in this period (an upgrade), no value
        value = None if counts is None else counts[field]
    else:
        try:
            value = metrics[group]
            if key:
                value = value[key]
        except (KeyError, TypeError):
            raise KeyError(f"metric {path!r} is missing from the metrics dict") from None
    return None if value is None else to_fraction(value, path)

