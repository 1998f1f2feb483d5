"""Period inputs of the KPI spec: values that are not events (spend by channel), by period label like targets."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kpimon.agents.core.kpi import compile_kpi
from kpimon.agents.core.periods import Calendar
from kpimon.agents.core.scorecard import evaluate_period
from kpimon.config.kpi_loading import from_mapping
from kpimon.config.settings import ConfigError

CAL = Calendar("UTC")
CAC = {"id": "cac_paid_search", "name": "CAC, paid search", "grain": "month", "direction": "lower", "target": "40",
       "formula": "inputs.spend.paid_search / new_users_by_channel.paid_search"}
SPEND = {"spend": {"paid_search": {"2024-01": "15000.00", "2024-02": "16000.50"},
                   "social": {"default": 2000}}}


def _spec(kpis=(CAC,), inputs=SPEND):
    return from_mapping({"kpis": list(kpis), "inputs": inputs}, "kpis.yaml")


def _evaluate(spec, label: str, new_paid: int) -> dict:
    p = CAL.parse("month", label)
    metrics = {"new_users_by_channel": {"paid_search": new_paid}}
    kpis, _ = evaluate_period(spec, "month", label, p.start_ms, p.end_ms, metrics, None, CAL)
    return kpis[0]


def test_a_formula_reads_the_input_of_its_period_exactly() -> None:
    spec = _spec()
    assert spec.inputs_for("2024-02") == {"spend": {"paid_search": Decimal("16000.50"), "social": Decimal(2000)}}
    jan = _evaluate(spec, "2024-01", 400)
    assert jan["actual"] == "37.5000" and jan["attainment"] == "1.0667"  # 15000 / 400; lower is better: 40 / 37.5
    assert _evaluate(spec, "2024-02", 300)["actual"] == "53.3350"  # 16000.50 / 300, exact
    # No value for March (no entry, no default): the KPI has no value, as a division by zero
    mar = _evaluate(spec, "2024-03", 300)
    assert mar["actual"] is None and mar["status"] == "no_data"


def test_inputs_are_constants_of_the_period_for_projection() -> None:
    # new users per unit of spend grows with the period like new users: projected linearly
    kpi = _spec(kpis=[{**CAC, "id": "per_spend", "formula": "new_users / inputs.spend.social"}]).kpis[0]
    assert compile_kpi(kpi).is_linear(lambda n: n == "new_users", lambda n: n.startswith("inputs."))
    assert not compile_kpi(_spec().kpis[0]).is_linear(lambda n: n.startswith("new_users"),
                                                      lambda n: n.startswith("inputs."))


@pytest.mark.parametrize(("formula", "fault"), [
    ("inputs.budget.paid_search / new_users", "'inputs.budget.paid_search': no input 'budget' (inputs: spend)"),
    ("inputs.spend.tv / new_users", "'inputs.spend.tv': input 'spend' has no 'tv' (keys: paid_search, social)"),
    ("inputs.spend / new_users", "write inputs.<name>.<key>"),
    ("prev.inputs.spend.social / new_users", "prev. cannot be used with them"),
])
def test_a_formula_naming_a_missing_input_is_refused(formula: str, fault: str) -> None:
    with pytest.raises(ConfigError) as err:
        _spec(kpis=[{**CAC, "formula": formula}])
    message = str(err.value).replace('"', "'")
    assert message.startswith("kpis.yaml: kpis.cac_paid_search.formula: ") and fault in message


def test_input_tables_are_validated_like_targets() -> None:
    with pytest.raises(ConfigError) as err:
        _spec(inputs={"spend": {"paid_search": {"2024-01": "lots"}}})
    assert "kpis.yaml: inputs.spend.paid_search" in str(err.value)
    with pytest.raises(ConfigError) as err:
        _spec(inputs={"spend": {"paid search": {"default": 1}}})
    assert "kpis.yaml: inputs.spend" in str(err.value)


def test_a_spec_without_inputs_keeps_its_fingerprint() -> None:
    plain = from_mapping({"kpis": [{**CAC, "formula": "revenue / new_users"}]}, "a.yaml")
    empty = from_mapping({"kpis": [{**CAC, "formula": "revenue / new_users"}], "inputs": {}}, "b.yaml")
    assert plain.fingerprint == empty.fingerprint
    assert _spec().fingerprint != _spec(inputs={"spend": {"paid_search": {"default": 1}, "social": {"default": 1}}}
                                        ).fingerprint
