"""Loading and validating a KPI spec file: cross-reference checks and error messages.

This module owns turning a YAML file or mapping into a valid
:class:`config.kpis.KpiSpec`: :func:`load_kpis` and :func:`from_mapping`
validate the whole spec at start-up and raise
:class:`config.settings.ConfigError`; :func:`spec_problems` makes the checks
that span several models (duplicate ids, known metrics and channels, period
labels, the owner tree, weights, grains, controllability).  Every line of an
error message names the file, the key and the fault, e.g.
``config/kpis.yaml: owners.ana.kpis: weights sum to 0.99, must be exactly 1``;
keys use ids, not list positions (``kpis.<kpi id>``, ``owners.<owner id>``,
``owners.<owner id>.kpis.<kpi id>``), and all problems of a file are reported
at once, one per line.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kpimon.agents.core.formula import PREV, FormulaError, parse_formula
from kpimon.agents.core.grains import Grain
from kpimon.agents.core.kpi_metrics import CHANNEL_SPLIT, INPUTS, metric_name_problem
from kpimon.agents.core.periods import Calendar
from kpimon.config.kpis import LEVELS, Holding, Kpi, KpiSpec, Owner, kpi_channels, number_text
from kpimon.config.settings import ConfigError, read_yaml

__all__ = ["DEFAULT_KPIS_PATH", "from_mapping", "load_kpis", "spec_problems"]

DEFAULT_KPIS_PATH = Path(__file__).with_name("kpis.yaml")
_UTC = Calendar("UTC")  # label syntax does not depend on the zone


# --------------------------------------------------------------------------- cross-reference checks


def spec_problems(spec: KpiSpec, channels: tuple[str, ...] | None = None, *,
                  retention_days: tuple[int, ...] | None = None) -> list[tuple[str, str]]:
    """Every cross-reference fault as (key, fault); empty if the spec is valid."""
    out: list[tuple[str, str]] = []
    kpis: dict[str, Kpi] = {}
    for k in spec.kpis:
        if k.id in kpis:
            out.append((f"kpis.{k.id}", "duplicate id"))
        kpis.setdefault(k.id, k)
    owners: dict[str, Owner] = {}
    for o in spec.owners:
        if o.id in owners:
            out.append((f"owners.{o.id}", "duplicate id"))
        owners.setdefault(o.id, o)
    departments = {o.id for o in spec.owners if o.level == "department"}
    for k in spec.kpis:
        out.extend(_kpi_problems(k, channels, departments, retention_days))
        out.extend(_input_problems(spec, k))
    if spec.owners:
        companies = [o.id for o in spec.owners if o.level == "company"]
        if len(companies) != 1:
            out.append(("owners", f"exactly one owner must have level company, found {len(companies)}"))
    for o in spec.owners:
        out.extend(_owner_problems(spec, o, owners, kpis, channels))
    return out

def _input_problems(spec: KpiSpec, k: Kpi) -> list[tuple[str, str]]:
    """A formula's ``inputs.<name>.<key>`` must name an input of the spec."""
    if k.formula is None:
        return []
    try:
        names = parse_formula(k.formula).names
    except FormulaError:
        return []  # reported by _kpi_problems
    out = []
    for name in names:
        group, _, rest = name.partition(".")
        input_name, _, key = rest.partition(".")
        if group != INPUTS or "." in key or not key:
            continue
        table = spec.inputs.get(input_name)
        if table is None:
            known = ", ".join(sorted(spec.inputs)) or "none"
            out.append((f"kpis.{k.id}.formula", f"{name!r}: no input {input_name!r} (inputs: {known})"))
        elif key not in table:
            out.append((f"kpis.{k.id}.formula", f"{name!r}: input {input_name!r} has no {key!r} "
                                                f"(keys: {', '.join(sorted(table))})"))
    return out


def _kpi_problems(k: Kpi, channels: tuple[str, ...] | None, departments: set[str],
                  retention_days: tuple[int, ...] | None = None) -> list[tuple[str, str]]:
    key = f"kpis.{k.id}"
    out: list[tuple[str, str]] = []
    names: tuple[str, ...] = ()
    if k.metric is not None:
        fault = metric_name_problem(k.metric, channels, allow_prev=False, retention_days=retention_days)
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
            fault = metric_name_problem(name, channels, retention_days=retention_days)
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

def _owner_problems(spec: KpiSpec, o: Owner, owners: dict[str, Owner], kpis: dict[str, Kpi],
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
            outer = spec.scope_of(parent.id)
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
        out.append((f"{key}.kpis", f"weights sum to {number_text(total)}, must be exactly 1"))
    if known and all(k.kind == "stretch" for _, k in known):
        out.append((f"{key}.kpis", "needs at least one committed KPI (stretch KPIs only add to a score)"))
    grains = sorted({Grain(k.grain).value for _, k in known}, key=lambda g: [x.value for x in Grain].index(g))
    if len(grains) > 1:
        out.append((f"{key}.kpis", f"mixes grains {' and '.join(grains)}: an owner is scored per period, "
                                   f"so all their KPIs must share one grain"))
    if not _rooted(o.id, owners):
        return out  # the broken link is reported; scope and department are unknown
    scope = spec.scope_of(o.id)
    dept = spec.department_of(o.id)
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


def from_mapping(data: Any, source: str = "<mapping>", channels: tuple[str, ...] | list[str] | None = None, *,
                 retention_days: tuple[int, ...] | None = None) -> KpiSpec:
    """Validate a mapping (as read from YAML).  ``channels``: the allowed channel labels
    (``Settings.channels``); ``None`` accepts any label; ``retention_days`` likewise for ``retention.d<N>``.
    KPIs without their own ``payout`` get the spec's curve."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    if "source" in data:
        raise ConfigError(f"{source}: source: unknown key")
    try:
        spec = KpiSpec.model_validate({**data, "source": source})
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, data)) from None
    problems = spec_problems(spec, tuple(channels) if channels is not None else None,
                             retention_days=retention_days)
    if problems:
        raise ConfigError("\n".join(f"{source}: {key}: {fault}" for key, fault in problems))
    kpis = tuple(k if k.payout is not None else k.model_copy(update={"payout": spec.payout}) for k in spec.kpis)
    return spec.model_copy(update={"kpis": kpis})


def load_kpis(path: str | Path | None = None, channels: tuple[str, ...] | list[str] | None = None, *,
              retention_days: tuple[int, ...] | None = None) -> KpiSpec:
    """Load and validate a KPI spec (default: the packaged ``config/kpis.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_KPIS_PATH
    return from_mapping(read_yaml(path, exact=True), str(path), channels, retention_days=retention_days)
