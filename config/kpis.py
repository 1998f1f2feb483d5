"""The KPI spec (``config/kpis.yaml``): KPIs, targets, owners, payout curve.

``load_kpis(path)`` validates the whole file at start-up and raises
:class:`config.settings.ConfigError`; every line of the message names the
file, the key and the fault, e.g.::

    config/kpis.yaml: owners.ana.kpis: weights sum to 0.99, must be exactly 1
    config/kpis.yaml: kpis.arpu.formula: unknown metric 'revnue' (metrics: ...)

Keys use ids, not list positions: ``kpis.<kpi id>``, ``owners.<owner id>``,
``owners.<owner id>.kpis.<kpi id>``.  All problems of a file are reported at
once, one per line.  Numbers are read exactly as written (``0.1`` is 1/10), so
weights must add up to exactly 1.  Evaluation lives in :mod:`agents.core.kpi`;
the format and the rules are documented in ``docs/kpis.md``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from kpimon.agents.core.formula import PREV, FormulaError, parse_formula
from kpimon.agents.core.kpi import CHANNEL_SPLIT, DEFAULT_CURVE, metric_name_problem
from kpimon.agents.core.periods import Calendar, Grain
from kpimon.config.settings import ConfigError, read_yaml

__all__ = [
    "DEFAULT_KPIS_PATH",
    "LEVELS",
    "Holding",
    "Kpi",
    "KpiSpec",
    "Owner",
    "Payout",
    "Profile",
    "Scope",
    "Segment",
    "Target",
    "from_mapping",
    "kpi_channels",
    "load_kpis",
]

DEFAULT_KPIS_PATH = Path(__file__).with_name("kpis.yaml")
LEVELS = ("company", "department", "role", "person")
_ID = r"^[A-Za-z][A-Za-z0-9_-]*$"
_UTC = Calendar("UTC")  # label syntax does not depend on the zone


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


def _num(value: Decimal) -> str:
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
            raise ValueError(f"floor ({_num(self.floor)}) must not be above cap ({_num(self.cap)})")
        if ys[0] < self.floor or ys[-1] > self.cap:
            raise ValueError(f"points: multipliers must lie within floor {_num(self.floor)} and cap {_num(self.cap)}")
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
            raise ValueError(f"thresholds: need 0 < off_track ({_num(self.off_track)}) "
                             f"< at_risk ({_num(self.at_risk)})")
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


class KpiSpec(_Model):
    payout: Payout = Payout()
    kpis: tuple[Kpi, ...] = Field(min_length=1)
    owners: tuple[Owner, ...] = ()
    source: str = Field(default="<mapping>", exclude=True)

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

    @staticmethod
    def _rooted(owner_id: str, owners: dict[str, Owner]) -> bool:
        """The owner's parents exist, levels go down, and the chain reaches the company."""
        seen: set[str] = set()
        o = owners.get(owner_id)
        while o is not None and o.id not in seen:
            if o.level == "company":
                return o.parent is None
            seen.add(o.id)
            parent = owners.get(o.parent) if o.parent is not None else None
            if parent is None or LEVELS.index(parent.level) >= LEVELS.index(o.level):
                return False
            o = parent
        return False

    @property
    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical spec: equal for equal specs, whatever the YAML layout."""
        data = _canon(self.model_dump(mode="python", exclude={"source"}))
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    # -- cross-reference checks -----------------------------------------------------
    def problems(self, channels: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
        """Every cross-reference fault as (key, fault); empty if the spec is valid."""
        out: list[tuple[str, str]] = []
        kpis: dict[str, Kpi] = {}
        for k in self.kpis:
            if k.id in kpis:
                out.append((f"kpis.{k.id}", "duplicate id"))
            kpis.setdefault(k.id, k)
        owners: dict[str, Owner] = {}
        for o in self.owners:
            if o.id in owners:
                out.append((f"owners.{o.id}", "duplicate id"))
            owners.setdefault(o.id, o)
        departments = {o.id for o in self.owners if o.level == "department"}
        for k in self.kpis:
            out.extend(self._kpi_problems(k, channels, departments))
        if self.owners:
            companies = [o.id for o in self.owners if o.level == "company"]
            if len(companies) != 1:
                out.append(("owners", f"exactly one owner must have level company, found {len(companies)}"))
        for o in self.owners:
            out.extend(self._owner_problems(o, owners, kpis, channels))
        return out

    def _kpi_problems(self, k: Kpi, channels: tuple[str, ...] | None,
                      departments: set[str]) -> list[tuple[str, str]]:
        key = f"kpis.{k.id}"
        out: list[tuple[str, str]] = []
        names: tuple[str, ...] = ()
        if k.metric is not None:
            fault = metric_name_problem(k.metric, channels, allow_prev=False)
            if fault:
                out.append((f"{key}.metric", fault))
            else:
                names = (k.metric,)
        else:
            try:
                names = parse_formula(k.formula).names
            except FormulaError as err:
                out.append((f"{key}.formula", str(err)))
            for name in names:
                fault = metric_name_problem(name, channels)
                if fault:
                    out.append((f"{key}.formula", fault))
        if k.segment is not None:
            ch = k.segment.channel
            if channels is not None and ch not in channels and ch not in ("other", "unknown"):
                out.append((f"{key}.segment.channel", f"unknown channel {ch!r} "
                                                      f"(channels: {', '.join([*channels, 'other', 'unknown'])})"))
            for name in names:
                base = name.removeprefix(PREV)
                if base not in CHANNEL_SPLIT:
                    split = ", ".join(f"{m} (as {v}.<channel>)" for m, v in CHANNEL_SPLIT.items())
                    out.append((f"{key}.segment", f"metric {base!r} is not available per channel; "
                                                  f"only {split} is split by channel today"))
        if k.department is not None and k.department not in departments:
            out.append((f"{key}.department", f"no owner {k.department!r} with level department"))
        for label in k.target.periods:
            try:
                _UTC.parse(k.grain, label)
            except (ValueError, TypeError) as err:
                out.append((f"{key}.target.{label}", str(err)))
        return out

    def _owner_problems(self, o: Owner, owners: dict[str, Owner], kpis: dict[str, Kpi],
                        channels: tuple[str, ...] | None) -> list[tuple[str, str]]:
        key = f"owners.{o.id}"
        out: list[tuple[str, str]] = []
        parent = None
        if o.level == "company":
            if o.parent is not None:
                out.append((f"{key}.parent", "the company is the root and has no parent"))
        elif o.parent is None:
            out.append((f"{key}.parent", f"required: a {o.level} reports to an owner one or more levels up"))
        elif o.parent not in owners:
            out.append((f"{key}.parent", f"no owner with id {o.parent!r}"))
        else:
            parent = owners[o.parent]
            if LEVELS.index(parent.level) >= LEVELS.index(o.level):
                out.append((f"{key}.level", f"a {o.level} cannot report to the {parent.level} {parent.id!r}: "
                                            f"levels go company > department > role > person"))
        if o.scope is not None:
            if channels is not None and o.scope.channels is not None:
                for ch in o.scope.channels:
                    if ch not in channels and ch not in ("other", "unknown"):
                        out.append((f"{key}.scope", f"unknown channel {ch!r}"))
            if parent is not None:
                outer = self.scope_of(parent.id)
                inner = None if o.scope.channels is None else frozenset(o.scope.channels)
                if not outer.covers(inner):
                    out.append((f"{key}.scope", f"{o.scope.describe()} lies outside the scope of its parent "
                                                f"{parent.id!r} ({outer.describe()})"))
        if not o.kpis:
            return out
        seen: set[str] = set()
        known: list[tuple[Holding, Kpi]] = []
        for h in o.kpis:
            hkey = f"{key}.kpis.{h.kpi}"
            if h.kpi in seen:
                out.append((hkey, "listed twice"))
                continue
            seen.add(h.kpi)
            if h.kpi not in kpis:
                out.append((hkey, f"no KPI with id {h.kpi!r}"))
                continue
            known.append((h, kpis[h.kpi]))
        total = sum((h.weight for h in o.kpis), Decimal(0))
        if sum((Fraction(h.weight) for h in o.kpis), Fraction(0)) != 1:
            out.append((f"{key}.kpis", f"weights sum to {_num(total)}, must be exactly 1"))
        if known and all(k.kind == "stretch" for _, k in known):
            out.append((f"{key}.kpis", "needs at least one committed KPI (stretch KPIs only add to a score)"))
        grains = sorted({Grain(k.grain).value for _, k in known}, key=lambda g: [x.value for x in Grain].index(g))
        if len(grains) > 1:
            out.append((f"{key}.kpis", f"mixes grains {' and '.join(grains)}: an owner is scored per period, "
                                       f"so all their KPIs must share one grain"))
        if not self._rooted(o.id, owners):
            return out  # the broken link is reported; scope and department are unknown
        scope = self.scope_of(o.id)
        dept = self.department_of(o.id)
        for _h, k in known:
            hkey = f"{key}.kpis.{k.id}"
            covered = kpi_channels(k)
            if not scope.covers(covered):
                what = "all channels" if covered is None else \
                    ", ".join(f"channel {c!r}" for c in sorted(covered))
                out.append((hkey, f"not controllable (scope): KPI {k.id!r} covers {what}, outside the scope "
                                  f"of owner {o.id!r} ({scope.describe()})"))
            if not o.manager:
                where = f"department {dept!r}" if dept is not None else "no department"
                if k.department is None:
                    out.append((hkey, f"not controllable (cross-department): KPI {k.id!r} is a company-level KPI "
                                      f"(no department) and owner {o.id!r} is not a manager"))
                elif k.department != dept:
                    out.append((hkey, f"not controllable (cross-department): KPI {k.id!r} belongs to department "
                                      f"{k.department!r}, owner {o.id!r} is in {where} and is not a manager"))
        return out


# --------------------------------------------------------------------------- loading


def _readable_loc(loc: tuple[Any, ...], data: Any) -> str:
    """pydantic's loc with list positions replaced by ids: kpis.3.target -> kpis.arpu.target."""
    parts: list[str] = []
    node = data
    prev: Any = None
    for part in loc:
        if prev == "target" and part == "periods":
            prev = part
            continue
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            item = node[part]
            ident = item.get("id", item.get("kpi")) if isinstance(item, dict) else None
            parts.append(str(ident) if isinstance(ident, str) and ident else str(part))
            node = item
        else:
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
        prev = part
    return ".".join(parts) or "<root>"


def _format_error(source: str, err: ValidationError, data: Any) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = _readable_loc(loc, data)
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif item["type"] == "missing":
            msg = "required"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def from_mapping(data: Any, source: str = "<mapping>", channels: tuple[str, ...] | list[str] | None = None) -> KpiSpec:
    """Validate a mapping (as read from YAML).  ``channels``: the allowed channel labels
    (``Settings.channels``); ``None`` accepts any label.  KPIs without their own ``payout``
    get the spec's curve."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    if "source" in data:
        raise ConfigError(f"{source}: source: unknown key")
    try:
        spec = KpiSpec.model_validate({**data, "source": source})
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, data)) from None
    problems = spec.problems(tuple(channels) if channels is not None else None)
    if problems:
        raise ConfigError("\n".join(f"{source}: {key}: {fault}" for key, fault in problems))
    kpis = tuple(k if k.payout is not None else k.model_copy(update={"payout": spec.payout}) for k in spec.kpis)
    return spec.model_copy(update={"kpis": kpis})


def load_kpis(path: str | Path | None = None, channels: tuple[str, ...] | list[str] | None = None) -> KpiSpec:
    """Load and validate a KPI spec (default: the packaged ``config/kpis.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_KPIS_PATH
    return from_mapping(read_yaml(path, exact=True), str(path), channels)
