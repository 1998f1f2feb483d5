"""docs/metrics.md's worked example, run through the worker's code path: its table must be what kpimon reports.

Rows whose cells are plain numbers or money strings are compared, and so are the growth, retention and cohort
rows; the composite cells (channel splits, ``n (c/d)``, ``a/s/s/c/d``) are checked field by field below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.factories import ms, settings_factory
from tests.pure_pipeline import run_pipeline

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
MONTHS = ("2024-01", "2024-02", "2024-03")


def _section() -> str:
    text = DOC.read_text()
    return text.split("## 6. Worked example", 1)[1].split("\n## 7.", 1)[0]


def _table(section: str) -> dict[str, list[str]]:
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("metric", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def _cell(value) -> str:
    if value is None:
        return "null"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _worked_example_report():
    """The worked example's input through the worker's code path."""
    block = re.search(r"```jsonl\n(.*?)```", _section(), re.S)
    assert block is not None
    lines = [line.encode() for line in block.group(1).splitlines() if line.strip()]
    # The example's settings: the defaults (thresholds 7d / 14d / 30d / 90d, retention 1, 7, 30 days, activation
    # within 7 days), UTC, two decimals.
    s = settings_factory(lifecycle={"silent_after": "7d", "sleeping_after": "14d", "churned_after": "30d",
                                    "dead_after": "90d", "warning_state": "sleeping"},
                         retention={"days": [1, 7, 30]}, activation={"window_days": 7})
    return run_pipeline(lines, s, 1, ms("2024-04-01T00:00:00Z"))


def test_the_worked_example_is_what_kpimon_reports() -> None:
    section = _section()
    report = _worked_example_report()
    months = [report[("month", m)] for m in MONTHS]
    table = _table(section)
    checked = 0
    for name, cells in table.items():
        key = name.split(" ")[0]
        if all(re.fullmatch(r'-?\d+|"[-0-9.]+"', c) for c in cells) and key in months[0]:
            assert [_cell(m[key]) for m in months] == cells, name
            checked += 1
        elif key.startswith("growth."):
            assert [_cell(m["growth"][key.split(".", 1)[1]]) for m in months] == cells, name
            checked += 1
        elif key.startswith("retention."):
            _, n, field = key.split(".")
            assert [_cell(m["retention"][n][field]) for m in months] == cells, name
            checked += 1
        elif key.startswith("activation."):
            assert [_cell(m["activation"][key.split(".", 1)[1]]) for m in months] == cells, name
            checked += 1
        elif key.startswith("cohorts."):
            assert [_cell(m["cohorts"].get(key.split(".", 1)[1])) for m in months] == cells, name
            checked += 1
    assert checked >= 28, f"only {checked} rows compared: did the table's format change?"
    assert [f"{m['won_back']} ({m['won_back_by_depth']['churned']}/{m['won_back_by_depth']['dead']})"
            for m in months] == table["won_back (churned / dead)"]
    pops = ["/".join(str(v) for v in m["population"].values()) for m in months]
    assert pops == table["population active/silent/sleeping/churned/dead"]
    assert json.dumps(months[0]["new_users_by_channel"]) == '{"paid_search": 1, "referral": 1}'
    assert report.totals["accepted"] == 8 and report.totals["rejected"] == 1 and report.totals["duplicates"] == 1


def test_the_cohort_table_example_in_operations_md_is_what_kpimon_cohorts_prints(tmp_path) -> None:
    """docs/operations.md's `kpimon cohorts --report` example, on the worked example's report."""
    from tests.cli_support import invoke

    report = _worked_example_report()
    (tmp_path / "report.json").write_text(json.dumps({"periods": [
        {"grain": grain, "period": label, "metrics": metrics} for (grain, label), metrics in report.items()]}))
    ops = (DOC.parent / "operations.md").read_text()
    example = re.search(r"\$ kpimon cohorts --grain month --report report.json --format csv\n(.*?)```", ops, re.S)
    assert example is not None
    result = invoke(["cohorts", "--grain", "month", "--report", str(tmp_path / "report.json"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == example.group(1).splitlines()
