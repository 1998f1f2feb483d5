"""The PromQL of the generated dashboards and of the alert rules, for checks and tests.

``panel_queries`` lists every query of every panel of a dashboard JSON;
``expand`` substitutes Grafana's variables the way Grafana would for given
values, so that a query can be sent to Prometheus as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "dashboards" / "generated"
RULES = ROOT / "deploy" / "rules" / "kpimon.rules.yml"

METRIC_NAME = re.compile(r"\bkpimon_[a-z0-9_]+")
RECORDED_NAME = re.compile(r"\bkpimon:[a-zA-Z0-9_:]+")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # uid
    panel: str      # title
    ref: str        # refId
    expr: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel!r} / {self.ref}: {self.expr}"


def dashboards(folder: Path = GENERATED) -> dict[str, dict]:
    """uid → dashboard JSON of every file in ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        out[data["uid"]] = data
    return out


def panels(dash: Mapping) -> Iterator[dict]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dash.get("panels", []):
        yield panel
        yield from panel.get("panels", []) or []


def panel_queries(dash: Mapping) -> list[PanelQuery]:
    return [PanelQuery(dash["uid"], p.get("title", ""), t.get("refId", ""), t["expr"])
            for p in panels(dash) if p.get("type") != "row" for t in p.get("targets", []) or []
            if t.get("expr") and not t.get("hide")]


def variable_queries(dash: Mapping) -> dict[str, str]:
    """name → query of the dashboard's query variables (``label_values(...)`` etc.)."""
    return {v["name"]: v["query"] for v in dash.get("templating", {}).get("list", []) if v.get("type") == "query"}


def variable_defaults(dash: Mapping) -> dict[str, str]:
    """name → current value of the custom variables."""
    return {v["name"]: v["current"]["value"] for v in dash.get("templating", {}).get("list", [])
            if v.get("type") == "custom" and v.get("current")}


def expand(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with ``$name`` / ``${name}`` replaced from ``values``; KeyError for an unknown variable."""
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]
    return _VARIABLE.sub(sub, expr)


def rules(path: Path = RULES) -> list[dict]:
    """Every rule (recording and alerting) of a Prometheus rule file."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [r for g in data["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def recorded_names(expr: str) -> set[str]:
    return set(RECORDED_NAME.findall(expr))
