"""The KPI spec's models (``config/kpis.yaml``): KPIs, targets, owners, payout curve.

This module owns the pydantic models of a KPI spec and the checks each model
can make on its own fields: exact numbers (``0.1`` is 1/10, so weights must
add up to exactly 1), targets per period label, expected-progress profiles,
payout curves, KPIs, owner scopes and holdings, and :class:`KpiSpec` with its
look-ups (a KPI or owner by id, an owner's department and effective scope)
and its fingerprint.  Loading a file and the cross-reference checks over the
whole spec live in :mod:`config.kpi_loading`, evaluation in
:mod:`agents.core.kpi`; the format and the rules are documented in
``docs/kpis.md``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from kpimon.agents.core.formula import PREV, FormulaError, parse_formula
from kpimon.agents.core.grains import Grain
from kpimon.agents.core.kpi_metrics import CHANNEL_SPLIT
from kpimon.agents.core.kpi_scoring import DEFAULT_CURVE

__all__ = [
    "LEVELS",
    "Holding",
    "Kpi",
    "KpiSpec",
    "Number",
    "Owner",
    "Payout",
    "Profile",
    "Scope",
    "Segment",
    "Target",
    "kpi_channels",
    "number_text",
]

LEVELS = ("company", "department", "role", "person")
_ID = r"^[A-Za-z][A-Za-z0-9_-]*$"


def _exact(value: Any) -> Decimal:
    """A number as written: ints, decimal strings, and floats read as the decimal they print as."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a bool")
    if isinstance(value, Decimal):
        out = value
    elif isinstance(value, int):
        out = Decimal(value)
    elif isinstance(value, float):
        out = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            out = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"expected a number, got {value!r}") from None
    else:
        raise ValueError(f"expected a number, got {type(value).__name__}")
    if not out.is_finite():
        raise ValueError(f"expected a finite number, got {value!r}")
    return out


Number = Annotated[Decimal, BeforeValidator(_exact)]
"""An exact number (stored as ``Decimal``); YAML ``0.4`` is exactly 4/10."""


def number_text(value: Decimal) -> str:
    """A Decimal as people write it: 0.99, 1, 1500 (no exponent, no trailing zeros)."""
    text = format(value.normalize(), "f")
    return text


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- KPI parts


class Segment(_Model):
    """Which slice of users a KPI counts.  Only acquisition channels are computable today."""

    channel: str = Field(pattern=r"^[A-Za-z0-9_-]+$")


def _segment_input(value: Any) -> Any:
    if isinstance(value, dict):
        other = sorted(str(k) for k in value if k != "channel")
        if other:
            raise ValueError(f"only channel segments are computable today (segment: {{channel: <name>}}); "
                             f"unsupported key(s): {', '.join(other)}")
    return value


class Target(_Model):
    """Per-period targets keyed by period label, and an optional ``default`` for other periods."""

    periods: dict[str, Number] = {}
    default: Number | None = None

    def for_label(self, label: str) -> Decimal | None:
        return self.periods.get(label, self.default)


def _label_key(key: Any) -> str:
    if isinstance(key, date):  # YAML reads an unquoted 2024-03-14 as a date
        return key.isoformat()
    if isinstance(key, int) and not isinstance(key, bool):  # an unquoted year 2024
        return str(key)
    if isinstance(key, str):
        return key
    raise ValueError(f"period label {key!r} must be a string such as \"2024-01\"")


def _target_input(value: Any) -> Any:
    if isinstance(value, Target):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("periods"), dict) and set(value) <= {"periods", "default"}:
            return value  # already canonical (a model_dump round trip)
        periods = {_label_key(k): v for k, v in value.items() if k != "default"}
        out: dict[str, Any] = {"periods": periods}
        if "default" in value:
            out["default"] = value["default"]
        if not periods and "default" not in value:
            raise ValueError("an empty table: give per-period targets and/or a default")
        return out
    return {"default": value}


class Profile(_Model):
    """Expected-progress shape: ``weekday`` (7 weights Mon..Sun) or ``day_of_month``
    (weights by day number; days not listed weigh ``default``)."""

    weekday: tuple[Number, ...] | None = None
    day_of_month: dict[int, Number] | None = None
    default: Number = Decimal(1)

    @model_validator(mode="after")
    def _check(self) -> Profile:
        if (self.weekday is None) == (self.day_of_month is None):
            raise ValueError("give exactly one of weekday or day_of_month")
        if self.weekday is not None:
            if len(self.weekday) != 7:
                raise ValueError(f"weekday: needs 7 weights (Mon..Sun), got {len(self.weekday)}")
            if any(w < 0 for w in self.weekday):
                raise ValueError("weekday: weights must not be negative")
            if not any(w > 0 for w in self.weekday):
                raise ValueError("weekday: at least one weight must be positive")
        if self.day_of_month is not None:
            bad = sorted(d for d in self.day_of_month if not 1 <= d <= 31)
            if bad:
                raise ValueError(f"day_of_month: days must be 1..31, got {bad[0]}")
            if any(w < 0 for w in self.day_of_month.values()) or self.default < 0:
                raise ValueError("day_of_month: weights must not be negative")
        return self


class Payout(_Model):
    """Payout curve: ``points`` [[attainment, multiplier], ...]; ``floor`` below the first
    point; flat after the last; clamped to [floor, cap]."""

    points: tuple[tuple[Number, Number], ...] = tuple(
        (Decimal(x.numerator) / Decimal(x.denominator), Decimal(y.numerator) / Decimal(y.denominator))
        for x, y in DEFAULT_CURVE.points)
    floor: Number = Decimal(0)
    cap: Number = Decimal("1.5")

    @model_validator(mode="after")
    def _check(self) -> Payout:
        if not self.points:
            raise ValueError("points: give at least one [attainment, multiplier] point")
        xs = [x for x, _ in self.points]
        ys = [y for _, y in self.points]
        if xs[0] < 0:
            raise ValueError("points: attainments must not be negative")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError("points: attainments must be strictly increasing")
        if any(b < a for a, b in zip(ys, ys[1:])):
            raise ValueError("points: multipliers must not decrease")
        if self.floor > self.cap:
            raise ValueError(f"floor ({number_text(self.floor)}) must not be above cap ({number_text(self.cap)})")
        if ys[0] < self.floor or ys[-1] > self.cap:
            raise ValueError(f"points: multipliers must lie within floor {number_text(self.floor)} "
                             f"and cap {number_text(self.cap)}")
        return self


class Kpi(_Model):
    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1)
    description: str = ""
    metric: str | None = None
    formula: str | None = None
    segment: Annotated[Segment | None, BeforeValidator(_segment_input)] = None
    department: str | None = None
    grain: Grain
    target: Annotated[Target, BeforeValidator(_target_input)]
    direction: Literal["higher", "lower"] = "higher"
    kind: Literal["committed", "stretch"] = "committed"
    at_risk: Number = Decimal("0.95")
    off_track: Number = Decimal("0.8")
    profile: Profile | None = None
    payout: Payout | None = None
    projection: Literal["linear", "as_is"] | None = None
    decimals: int | None = Field(default=None, ge=0, le=8)

    @model_validator(mode="after")
    def _check(self) -> Kpi:
        if (self.metric is None) == (self.formula is None):
            raise ValueError("give exactly one of metric or formula")
        if not 0 < self.off_track < self.at_risk:
            raise ValueError(f"thresholds: need 0 < off_track ({number_text(self.off_track)}) "
                             f"< at_risk ({number_text(self.at_risk)})")
        values = [*self.target.periods.values(), *([self.target.default] if self.target.default is not None else [])]
        if any(v <= 0 for v in values):
            raise ValueError("target: targets must be positive")
        if self.profile is not None and self.grain == Grain.DAY:
            raise ValueError("profile: has no effect on grain day (progress within a day is linear)")
        return self

    def target_for(self, label: str) -> Decimal | None:
        """The target of the period called ``label`` (or the default), ``None`` if none."""
        return self.target.for_label(label)


class Scope(_Model):
    """What an owner controls: ``channels`` (``None`` = all channels)."""

    channels: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")], ...] | None = None

    @field_validator("channels")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("give at least one channel, or write scope: all")
        return value

    def covers(self, channels: frozenset[str] | None) -> bool:
        if self.channels is None:
            return True
        return channels is not None and channels <= set(self.channels)

    def describe(self) -> str:
        return "all" if self.channels is None else f"channels: {', '.join(self.channels)}"


def _scope_input(value: Any) -> Any:
    if value == "all":
        return {"channels": None}
    if isinstance(value, str):
        raise ValueError(f"expected all or {{channels: [...]}}, got {value!r}")
    return value


class Holding(_Model):
    kpi: str
    weight: Number

    @field_validator("weight")
    @classmethod
    def _positive(cls, value: Decimal) -> Decimal:
        if not 0 < value <= 1:
            raise ValueError("must be greater than 0 and at most 1")
        return value


class Owner(_Model):
    id: str = Field(pattern=_ID)
    name: str = Field(min_length=1)
    level: Literal["company", "department", "role", "person"]
    parent: str | None = None
    scope: Annotated[Scope | None, BeforeValidator(_scope_input)] = None  # None: the parent's scope
    manager: bool = False
    kpis: tuple[Holding, ...] = ()


# --------------------------------------------------------------------------- the spec


def kpi_channels(kpi: Kpi) -> frozenset[str] | None:
    """The channels a KPI counts, ``None`` for all channels (unsegmented)."""
    if kpi.segment is not None:
        return frozenset({kpi.segment.channel})
    try:
        names = parse_formula(kpi.metric if kpi.metric is not None else kpi.formula).names
    except FormulaError:
        return None
    channels = set()
    for name in names:
        base = name.removeprefix(PREV)
        group, _, key = base.partition(".")
        if group not in CHANNEL_SPLIT.values() or not key:
            return None
        channels.add(key)
    return frozenset(channels) or None


def _canon(value: Any) -> Any:
    if isinstance(value, Decimal):
        f = Fraction(value)
        return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    if isinstance(value, Grain):
        return value.value
    return value


_Name = Annotated[str, Field(pattern=_ID)]
PeriodTable = Annotated[Target, BeforeValidator(_target_input)]


class KpiSpec(_Model):
    payout: Payout = Payout()
    kpis: tuple[Kpi, ...] = Field(min_length=1)
    owners: tuple[Owner, ...] = ()
    # Period inputs: values that are not events (marketing spend by channel...), as tables by period label like
    # targets: ``inputs.<name>.<key>`` in formulas (docs/kpis.md).
    inputs: dict[_Name, dict[_Name, PeriodTable]] = {}
    source: str = Field(default="<mapping>", exclude=True)

    def inputs_for(self, label: str) -> dict[str, dict[str, Decimal]]:
        """Every input's value for the period called ``label`` (or its default); keys without one are left out."""
        out: dict[str, dict[str, Decimal]] = {}
        for name, table in self.inputs.items():
            values = {key: v for key, t in table.items() if (v := t.for_label(label)) is not None}
            if values:
                out[name] = values
        return out

    # -- look-ups -------------------------------------------------------------------
    def kpi(self, kpi_id: str) -> Kpi:
        for k in self.kpis:
            if k.id == kpi_id:
                return k
        raise KeyError(f"no KPI {kpi_id!r}")

    def owner(self, owner_id: str) -> Owner:
        for o in self.owners:
            if o.id == owner_id:
                return o
        raise KeyError(f"no owner {owner_id!r}")

    def department_of(self, owner_id: str) -> str | None:
        """Id of the department the owner is in (itself for a department), ``None`` for the company."""
        owners = {o.id: o for o in self.owners}
        seen: set[str] = set()
        o = owners.get(owner_id)
        while o is not None and o.id not in seen:
            if o.level == "department":
                return o.id
            seen.add(o.id)
            o = owners.get(o.parent) if o.parent is not None else None
        return None

    def scope_of(self, owner_id: str) -> Scope:
        """The owner's effective scope: its own, else its nearest ancestor's, else all."""
        owners = {o.id: o for o in self.owners}
        seen: set[str] = set()
        o = owners.get(owner_id)
        while o is not None and o.id not in seen:
            if o.scope is not None:
                return o.scope
            seen.add(o.id)
            o = owners.get(o.parent) if o.parent is not None else None
        return Scope()

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical spec: equal for equal specs, whatever the YAML layout."""
        # (A spec without inputs hashes as before they existed.)
        data = _canon(self.model_dump(mode="python", exclude={"source"} if self.inputs else {"source", "inputs"}))
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()
