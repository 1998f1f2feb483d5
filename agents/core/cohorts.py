"""The signup-cohort table from closed periods.  Pure.

Each closed week or month carries ``cohorts``: for itself and each of the ``retention.cohort_horizon``
periods before it, how many users whose first signup fell in that period (the cohort) were active in it
(``PeriodMetrics.cohorts``).  :func:`cohort_table` turns those columns into rows: one per cohort, its size
(its users active in their own period: all of them, since a signup is an activity) and its active users at
each offset 0, 1, 2, ... (``None`` where that period is not closed, or its cohort counts are not known).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from kpimon.agents.core.grains import Grain, coerce_grain, label_first_day

COHORT_GRAINS = (Grain.WEEK, Grain.MONTH)


@dataclass(frozen=True)
class CohortRow:
    cohort: str
    size: int | None  # offset 0: the cohort's new users
    active: tuple[int | None, ...]  # by offset, 0 first

    def rate(self, offset: int) -> float | None:
        """Share of the cohort active at ``offset`` (for display; the counts are exact)."""
        n = self.active[offset] if offset < len(self.active) else None
        return None if n is None or not self.size else n / self.size


def _index(grain: Grain, label: str) -> int:
    """Periods since a fixed origin: offsets are differences of these."""
    first: date = label_first_day(grain, label)
    if grain is Grain.MONTH:
        return first.year * 12 + first.month - 1
    return first.toordinal() // 7  # ISO weeks start on Monday: ordinals of Mondays differ by multiples of 7


def cohort_table(periods: Iterable[tuple[str, Mapping[str, Any]]], grain: Grain | str) -> list[CohortRow]:
    """Rows, oldest cohort first, from ``(label, metrics result)`` of closed periods of ``grain``.

    Cohorts without any signup are left out; a row's offsets reach the last closed period it was counted in.
    """
    grain = coerce_grain(grain)
    if grain not in COHORT_GRAINS:
        raise ValueError(f"cohorts are counted by week and by month, not by {grain.value}")
    cells: dict[str, dict[int, int]] = {}
    for label, metrics in periods:
        at = _index(grain, label)
        for cohort, n in (metrics.get("cohorts") or {}).items():
            cells.setdefault(cohort, {})[at - _index(grain, cohort)] = int(n)
    rows = []
    for cohort in sorted(cells, key=lambda c: _index(grain, c)):
        by_offset = cells[cohort]
        size = by_offset.get(0)
        if not size:
            continue
        width = max(by_offset) + 1
        rows.append(CohortRow(cohort, size, tuple(by_offset.get(k) for k in range(width))))
    return rows


def as_json(rows: list[CohortRow], grain: Grain | str) -> dict[str, Any]:
    return {"grain": coerce_grain(grain).value,
            "cohorts": [{"cohort": r.cohort, "size": r.size, "active": list(r.active)} for r in rows]}


def as_csv_rows(rows: list[CohortRow]) -> list[list[Any]]:
    """A header and one row per (cohort, offset): long form, for spreadsheets and pivot tables."""
    out: list[list[Any]] = [["cohort", "size", "offset", "active"]]
    for r in rows:
        for offset, n in enumerate(r.active):
            out.append([r.cohort, r.size, offset, "" if n is None else n])
    return out
