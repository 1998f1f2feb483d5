"""KPI evaluation of one period for every KPI of its grain, and every owner's score.  Pure."""

from __future__ import annotations

from typing import Any

from kpimon.agents.core.grains import Grain, Period
from kpimon.agents.core.kpi import evaluate_kpi
from kpimon.agents.core.kpi_metrics import INPUTS
from kpimon.agents.core.owner_scores import score_owner
from kpimon.agents.core.periods import Calendar


def evaluate_period(spec: Any, grain: str, label: str, start: int, end: int, metrics: dict[str, Any],
                    prev: dict[str, Any] | None, calendar: Calendar, *, now_ms: int | None = None,
                    closed: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(KPI results, owner scores) as plain dicts, in spec order."""
    period = Period(Grain(grain), label, start, end)
    now = end if now_ms is None else now_ms
    inputs = spec.inputs_for(label) if getattr(spec, "inputs", None) else {}
    if inputs:  # formulas read them as inputs.<name>.<key> (kpi_metrics.lookup)
        metrics = {**metrics, INPUTS: inputs}
    results = {kpi.id: evaluate_kpi(kpi, metrics, prev, period, now, calendar, closed)
               for kpi in spec.kpis if str(kpi.grain) == str(grain)}
    owners = [score_owner(owner, results).to_dict() for owner in spec.owners
              if owner.kpis and all(h.kpi in results for h in owner.kpis)]
    return [r.to_dict() for r in results.values()], owners
