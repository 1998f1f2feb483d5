"""Owner scores: rolling an owner's KPI results up into one multiplier and score.  Pure.

This module owns combining the :class:`~agents.core.kpi.KpiResult` of the KPIs
an owner holds (:class:`config.kpis.Owner`) by their weights:

* owner multiplier = sum over committed KPIs of weight' x multiplier (weights
  renormalised over the committed KPIs that have a value) + sum over stretch
  KPIs of weight x max(0, multiplier - 1): a stretch KPI can only add;
* owner score = the same rule applied to the *credited* attainment (attainment
  clipped to ``[0, last curve point]``) instead of the multiplier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, cast

from kpimon.agents.core.kpi import KpiResult
from kpimon.agents.core.kpi_scoring import exact_number, fmt

if TYPE_CHECKING:  # pragma: no cover
    from kpimon.config.kpis import Owner

__all__ = ["Contribution", "OwnerScore", "score_owner"]



@dataclass(frozen=True)
class Contribution:
    kpi: str
    kind: str
    weight: Fraction              # as configured
    effective_weight: Fraction    # committed: renormalised over the committed KPIs with a value
    attainment: Fraction | None   # credited attainment (clipped to [0, last curve point])
    multiplier: Fraction | None
    contribution: Fraction        # to the owner multiplier
    status: str
    counted: bool                 # False: no value or no target, left out

    def to_dict(self) -> dict[str, Any]:
        return {"kpi": self.kpi, "kind": self.kind, "weight": fmt(self.weight),
                "effective_weight": fmt(self.effective_weight), "attainment": fmt(self.attainment),
                "multiplier": fmt(self.multiplier), "contribution": fmt(self.contribution),
                "status": self.status, "counted": self.counted}


@dataclass(frozen=True)
class OwnerScore:
    """``multiplier``: the payout multiplier (bonus = target bonus x multiplier).
    ``score``: weighted credited attainment, same weighting rule.  Both ``None`` when no
    committed KPI of the owner has a value (the owner cannot be scored for the period)."""

    owner: str
    score: Fraction | None
    multiplier: Fraction | None
    committed: Fraction | None
    stretch_bonus: Fraction
    contributions: tuple[Contribution, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "score": fmt(self.score), "multiplier": fmt(self.multiplier),
                "committed": fmt(self.committed), "stretch_bonus": fmt(self.stretch_bonus),
                "contributions": [c.to_dict() for c in self.contributions]}


def score_owner(owner: Owner, results: Mapping[str, KpiResult]) -> OwnerScore:
    """Combine the owner's KPI results (``results[kpi_id]``) by their weights.

    Committed KPIs: weight renormalised over the committed KPIs that have a value,
    contribution = weight' x multiplier.  Stretch KPIs: contribution =
    weight x max(0, multiplier - 1), so they can only add.  KPIs without a value or
    target (status no_data / no_target) are left out.
    """
    holdings = [(h.kpi, exact_number(h.weight, "weight")) for h in owner.kpis]
    missing = [k for k, _ in holdings if k not in results]
    if missing:
        raise KeyError(f"owner {owner.id!r}: no result for KPI(s) {', '.join(missing)}")
    counted = {k: results[k].multiplier is not None for k, _ in holdings}
    committed_weight = sum((w for k, w in holdings if results[k].kind != "stretch" and counted[k]), Fraction(0))
    contributions: list[Contribution] = []
    committed = stretch = score_c = score_s = Fraction(0)
    for kpi_id, weight in holdings:
        r = results[kpi_id]
        m = r.multiplier  # `m is not None` is counted[kpi_id]
        # A counted result has a credited attainment too (evaluate_kpi sets both or neither).
        if r.kind == "stretch":
            eff = weight
            contrib = weight * max(Fraction(0), m - 1) if m is not None else Fraction(0)
            stretch += contrib
            if m is not None:
                score_s += weight * max(Fraction(0), cast(Fraction, r.credited_attainment) - 1)
        else:
            eff = weight / committed_weight if m is not None else Fraction(0)
            contrib = eff * m if m is not None else Fraction(0)
            committed += contrib
            if m is not None:
                score_c += eff * cast(Fraction, r.credited_attainment)
        contributions.append(Contribution(kpi_id, r.kind, weight, eff, r.credited_attainment, r.multiplier,
                                          contrib, r.status, counted[kpi_id]))
    if committed_weight == 0:
        return OwnerScore(owner.id, None, None, None, stretch, tuple(contributions))
    return OwnerScore(owner.id, score_c + score_s, committed + stretch, committed, stretch, tuple(contributions))
