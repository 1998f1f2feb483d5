"""KPI layer: formulas, spec validation, controllability, payout, scores, progress, targets."""

from __future__ import annotations

import copy
from decimal import Decimal
from fractions import Fraction as F

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kpimon.agents.core.formula import FormulaError, parse_formula
from kpimon.agents.core.kpi import KpiResult, evaluate_kpi, expected_progress, kpi_actual
from kpimon.agents.core.kpi_scoring import DEFAULT_CURVE, Curve, attainment, fmt, payout, status_for
from kpimon.agents.core.kpi_targets import suggest_target
from kpimon.agents.core.owner_scores import score_owner
from kpimon.agents.core.periods import Calendar
from kpimon.config.kpi_loading import DEFAULT_KPIS_PATH, from_mapping, load_kpis
from kpimon.config.kpis import Holding, Owner, Profile
from kpimon.config.settings import ConfigError

CAL = Calendar("UTC")
CHANNELS = ("organic", "paid_search", "social", "email", "referral")


def metrics(**kw):
    base = {"new_users": 0, "active_users": 0, "orders": 0, "paying_users": 0, "revenue": "0.00",
            "refunds": "0.00", "invites": 0, "referred_signups": 0, "entered_silent": 0, "entered_sleeping": 0,
            "entered_churned": 0, "entered_dead": 0, "churn_warnings": 0, "churned": 0, "won_back": 0,
            "won_back_by_depth": {"churned": 0, "dead": 0},
            "population": {"active": 0, "silent": 0, "sleeping": 0, "churned": 0, "dead": 0},
            "new_users_by_channel": {}}
    base.update(kw)
    return base


def ms(iso: str) -> int:
    from datetime import datetime
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


# --------------------------------------------------------------------------- formulas

M = metrics(revenue="100.00", active_users=8, paying_users=3, churned=0, won_back=2, orders=5,
            new_users_by_channel={"paid_search": 7}, population={"active": 40, "silent": 0, "sleeping": 0,
                                                                "churned": 0, "dead": 0})
PREV_M = metrics(population={"active": 50, "silent": 1, "sleeping": 2, "churned": 3, "dead": 4}, orders=4)


@pytest.mark.parametrize(
    ("text", "prev", "expected"),
    [
        ("revenue / active_users", PREV_M, F(25, 2)),
        ("revenue / paying_users", PREV_M, F(100, 3)),
        ("won_back / churned", PREV_M, None),                          # 0 churned: no value
        ("(won_back / churned) * 100 + 1", PREV_M, None),              # None propagates
        ("1 / (orders - orders)", PREV_M, None),
        ("won_back / prev.population.active", PREV_M, F(2, 50)),
        ("population.active / prev.population.active", PREV_M, F(4, 5)),
        ("orders - prev.orders", PREV_M, F(1)),
        ("orders - prev.orders", None, None),                          # no previous period: no value
        ("1 + 2 * 3", None, F(7)),                                     # precedence
        ("(1 + 2) * 3", None, F(9)),
        ("10 - 4 - 3", None, F(3)),                                    # left associative
        ("2 * 3 / 4", None, F(3, 2)),
        ("-revenue + 1", None, F(-99)),
        ("+orders", None, F(5)),
        ("0.1 + 0.2", None, F(3, 10)),                                 # exact decimals
        ("1e3 / 8", None, F(125)),
        ("new_users_by_channel.paid_search", None, F(7)),
        ("new_users_by_channel.social", None, F(0)),                   # omitted channel = 0
        ("won_back_by_depth.dead + won_back", None, F(2)),
    ],
)
def test_formula_evaluation(text, prev, expected):
    f = parse_formula(text)

    def resolve(name):
        from kpimon.agents.core.kpi_metrics import lookup
        if name.startswith("prev."):
            return None if prev is None else lookup(prev, name[5:])
        return lookup(M, name)

    assert f.evaluate(resolve) == expected


def test_formula_names_and_prev():
    f = parse_formula("churned / prev.population.active + churned")
    assert f.names == ("churned", "prev.population.active")
    assert f.uses_prev
    assert not parse_formula("revenue / active_users").uses_prev


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("__import__('os')", "function calls are not allowed"),
        ("abs(revenue)", "function calls are not allowed"),
        ("revenue.__class__", "attribute access is not allowed: 'revenue.__class__'"),
        ("(revenue + 1).real", "attribute access is not allowed (only dotted metric names"),
        ("population['active']", "subscripts are not allowed"),
        ("revenue ** 2", "operator ** is not allowed"),
        ("revenue // 2", "operator // is not allowed"),
        ("revenue % 2", "operator % is not allowed"),
        ("revenue > 1", "comparisons are not allowed"),
        ("revenue and orders", "boolean operators are not allowed"),
        ("not revenue", "unary operator Not is not allowed"),
        ("revenue if orders else 0", "conditional expressions are not allowed"),
        ("lambda: 1", "lambdas are not allowed"),
        ("'text'", "only numbers are allowed as constants"),
        ("True", "only numbers are allowed as constants"),
        ("[revenue]", "lists are not allowed"),
        ("(x := 1)", "assignments are not allowed"),
        ("revenue /", "invalid syntax"),
        ("revenue = 1", "invalid syntax"),
        ("", "is empty"),
        ("1 +" + " 1 +" * 300 + " 1", "longer than"),
    ],
)
def test_formula_refuses_other_syntax(text, fault):
    with pytest.raises(FormulaError) as err:
        parse_formula(text)
    assert fault in str(err.value)


def test_linear_formulas_are_detected():
    from kpimon.agents.core.kpi_metrics import is_additive
    assert parse_formula("revenue - refunds").is_linear(is_additive)
    assert parse_formula("2 * orders / 4").is_linear(is_additive)
    assert not parse_formula("revenue / active_users").is_linear(is_additive)
    assert not parse_formula("orders + 1").is_linear(is_additive)
    assert not parse_formula("orders - prev.orders").is_linear(is_additive)
    prev_is_fixed = lambda name: name.startswith("prev.")  # noqa: E731 - known for the whole period
    assert parse_formula("churned / prev.population.active").is_linear(is_additive, prev_is_fixed)
    assert not parse_formula("orders - prev.orders").is_linear(is_additive, prev_is_fixed)
    assert not parse_formula("prev.orders / orders").is_linear(is_additive, prev_is_fixed)


# --------------------------------------------------------------------------- spec helpers

KPIS = [
    {"id": "nu", "name": "New users", "metric": "new_users", "department": "growth", "grain": "month",
     "target": 100},
    {"id": "nu_paid", "name": "New users paid", "metric": "new_users", "segment": {"channel": "paid_search"},
     "department": "growth", "grain": "month", "target": 50},
    {"id": "nu_paid_stretch", "name": "New users paid (stretch)", "metric": "new_users", "kind": "stretch",
     "segment": {"channel": "paid_search"}, "department": "growth", "grain": "month", "target": 60},
    {"id": "nu_social", "name": "New users social", "metric": "new_users", "segment": {"channel": "social"},
     "department": "growth", "grain": "month", "target": 20},
    {"id": "churn", "name": "Churn rate", "formula": "churned / prev.population.active",
     "department": "lifecycle", "direction": "lower", "grain": "month", "target": 0.05},
    {"id": "rev", "name": "Revenue", "metric": "revenue", "grain": "month", "target": "1000.00"},
    {"id": "arpu", "name": "ARPU", "formula": "revenue / active_users", "department": "growth", "grain": "month",
     "target": 4},
    {"id": "orders_q", "name": "Orders per quarter", "metric": "orders", "department": "growth", "grain": "quarter",
     "target": 300},
]
OWNERS = [
    {"id": "acme", "name": "Acme", "level": "company", "manager": True},
    {"id": "growth", "name": "Growth", "level": "department", "parent": "acme", "manager": True},
    {"id": "lifecycle", "name": "Lifecycle", "level": "department", "parent": "acme", "manager": True},
    {"id": "paid", "name": "Paid acquisition", "level": "role", "parent": "growth",
     "scope": {"channels": ["paid_search"]}},
    {"id": "ana", "name": "Ana", "level": "person", "parent": "paid", "kpis": [{"kpi": "nu_paid", "weight": 1}]},
    {"id": "ben", "name": "Ben", "level": "person", "parent": "growth", "kpis": [{"kpi": "nu", "weight": 1}]},
]
BASE = {"kpis": KPIS, "owners": OWNERS}


def build(data=None, channels=CHANNELS):
    return from_mapping(copy.deepcopy(BASE if data is None else data), "kpis.yaml", channels)


def variant(owner=None, holdings=None, owner_changes=None, kpi=None, kpi_changes=None, extra_owner=None,
            extra_kpi=None):
    data = copy.deepcopy(BASE)
    for o in data["owners"]:
        if o["id"] == owner:
            if holdings is not None:
                o["kpis"] = holdings
            o.update(owner_changes or {})
    for k in data["kpis"]:
        if k["id"] == kpi:
            k.update(kpi_changes or {})
    if extra_owner:
        data["owners"].append(extra_owner)
    if extra_kpi:
        data["kpis"].append(extra_kpi)
    return data


def refused(data) -> str:
    with pytest.raises(ConfigError) as err:
        build(data)
    return str(err.value)


def test_base_spec_is_valid():
    spec = build()
    assert spec.scope_of("ana").channels == ("paid_search",)   # inherited from the role
    assert spec.department_of("ana") == "growth"
    assert spec.department_of("acme") is None
    assert spec.kpi("churn").payout is not None              # the spec's curve was filled in


# --------------------------------------------------------------------------- weights


def test_weights_that_do_not_sum_to_one_are_refused():
    data = variant("ben", [{"kpi": "nu", "weight": 0.5}, {"kpi": "arpu", "weight": 0.49}])
    assert refused(data) == "kpis.yaml: owners.ben.kpis: weights sum to 0.99, must be exactly 1"


def test_weights_are_exact_not_float():
    assert 0.7 + 0.2 + 0.1 != 1.0  # in floats this is 0.9999999999999999
    for order in ((0.1, 0.2, 0.7), (0.7, 0.2, 0.1)):
        data = variant("ben", [{"kpi": k, "weight": w} for k, w in zip(("nu", "arpu", "nu_paid"), order)])
        spec = build(data)
        assert [h.weight for h in spec.owner("ben").kpis] == [Decimal(repr(w)) for w in order]
        assert sum(F(h.weight) for h in spec.owner("ben").kpis) == 1


@pytest.mark.parametrize(
    ("holdings", "message"),
    [
        ([{"kpi": "nu", "weight": 0}], "kpis.yaml: owners.ben.kpis.nu.weight: must be greater than 0 and at most 1"),
        ([{"kpi": "nope", "weight": 1}], "kpis.yaml: owners.ben.kpis.nope: no KPI with id 'nope'"),
        ([{"kpi": "nu", "weight": 0.5}, {"kpi": "nu", "weight": 0.5}], "kpis.yaml: owners.ben.kpis.nu: listed twice"),
        ([{"kpi": "nu", "weight": 0.5}, {"kpi": "orders_q", "weight": 0.5}],
         "kpis.yaml: owners.ben.kpis: mixes grains month and quarter: an owner is scored per period, "
         "so all their KPIs must share one grain"),
        ([{"kpi": "nu", "weight": True}], "kpis.yaml: owners.ben.kpis.nu.weight: expected a number, got a bool"),
    ],
    ids=["zero", "unknown-kpi", "twice", "grains", "bool"],
)
def test_holding_faults(holdings, message):
    assert message in refused(variant("ben", holdings))


def test_stretch_only_owner_is_refused():
    data = variant("ana", [{"kpi": "nu_paid_stretch", "weight": 1}])
    assert refused(data) == ("kpis.yaml: owners.ana.kpis: needs at least one committed KPI "
                             "(stretch KPIs only add to a score)")


# --------------------------------------------------------------------------- controllability and tree


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (variant("ana", [{"kpi": "nu_social", "weight": 1}]),
         "kpis.yaml: owners.ana.kpis.nu_social: not controllable (scope): KPI 'nu_social' covers channel "
         "'social', outside the scope of owner 'ana' (channels: paid_search)"),
        (variant("ana", [{"kpi": "nu", "weight": 1}]),
         "kpis.yaml: owners.ana.kpis.nu: not controllable (scope): KPI 'nu' covers all channels, outside the "
         "scope of owner 'ana' (channels: paid_search)"),
        (variant("ben", [{"kpi": "churn", "weight": 1}]),
         "kpis.yaml: owners.ben.kpis.churn: not controllable (cross-department): KPI 'churn' belongs to "
         "department 'lifecycle', owner 'ben' is in department 'growth' and is not a manager"),
        (variant("ben", [{"kpi": "rev", "weight": 1}]),
         "kpis.yaml: owners.ben.kpis.rev: not controllable (cross-department): KPI 'rev' is a company-level "
         "KPI (no department) and owner 'ben' is not a manager"),
        (variant(extra_kpi={"id": "nu_by_formula", "name": "x", "formula": "new_users_by_channel.email",
                            "department": "growth", "grain": "month", "target": 1},
                 owner="ana", holdings=[{"kpi": "nu_by_formula", "weight": 1}]),
         "kpis.yaml: owners.ana.kpis.nu_by_formula: not controllable (scope): KPI 'nu_by_formula' covers "
         "channel 'email', outside the scope of owner 'ana' (channels: paid_search)"),
    ],
    ids=["segment-outside-scope", "unsegmented-for-scoped-owner", "cross-department", "company-level",
         "channel-metric-outside-scope"],
)
def test_controllability_refusals(data, message):
    assert refused(data) == message


def test_managers_may_hold_cross_department_and_company_kpis():
    data = variant("ben", [{"kpi": "churn", "weight": 0.5}, {"kpi": "rev", "weight": 0.5}],
                   owner_changes={"manager": True})
    spec = build(data)
    assert [h.kpi for h in spec.owner("ben").kpis] == ["churn", "rev"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (variant("ben", owner_changes={"parent": "sales"}), "kpis.yaml: owners.ben.parent: no owner with id 'sales'"),
        (variant(extra_owner={"id": "ops", "name": "Ops", "level": "department", "parent": "paid"}),
         "kpis.yaml: owners.ops.level: a department cannot report to the role 'paid': "
         "levels go company > department > role > person"),
        (variant(extra_owner={"id": "bo", "name": "Bo", "level": "person", "parent": "ana"}),
         "kpis.yaml: owners.bo.level: a person cannot report to the person 'ana': "
         "levels go company > department > role > person"),
        (variant(extra_owner={"id": "x", "name": "X", "level": "role"}),
         "kpis.yaml: owners.x.parent: required: a role reports to an owner one or more levels up"),
        (variant("acme", owner_changes={"parent": "growth"}),
         "kpis.yaml: owners.acme.parent: the company is the root and has no parent"),
        (variant(extra_owner={"id": "x", "name": "X", "level": "person", "parent": "paid", "scope": "all"}),
         "kpis.yaml: owners.x.scope: all lies outside the scope of its parent 'paid' (channels: paid_search)"),
        (variant(extra_owner={"id": "x", "name": "X", "level": "person", "parent": "paid",
                              "scope": {"channels": ["social"]}}),
         "kpis.yaml: owners.x.scope: channels: social lies outside the scope of its parent 'paid' "
         "(channels: paid_search)"),
        (variant(extra_owner={"id": "ana", "name": "Ana 2", "level": "person", "parent": "paid"}),
         "kpis.yaml: owners.ana: duplicate id"),
        (variant("ben", owner_changes={"level": "boss"}),
         "kpis.yaml: owners.ben.level: Input should be 'company', 'department', 'role' or 'person'"),
        (variant("ben", owner_changes={"scope": "some"}),
         "kpis.yaml: owners.ben.scope: expected all or {channels: [...]}, got 'some'"),
    ],
    ids=["parent", "level-up", "person-under-person", "no-parent", "company-parent", "scope-all-under-scoped",
         "scope-outside-parent", "duplicate", "bad-level", "bad-scope"],
)
def test_owner_tree_faults(data, message):
    assert refused(data) == message


# --------------------------------------------------------------------------- KPI faults


@pytest.mark.parametrize(
    ("kpi", "changes", "message"),
    [
        ("arpu", {"formula": "revnue / active_users"}, "kpis.yaml: kpis.arpu.formula: unknown metric 'revnue'"),
        ("arpu", {"formula": "revenue / prev.prev.active_users"},
         "kpis.yaml: kpis.arpu.formula: 'prev.prev.active_users': prev. can only be used once"),
        ("arpu", {"formula": "revenue / population.awake"},
         "kpis.yaml: kpis.arpu.formula: unknown metric 'population.awake': population has active, silent, "
         "sleeping, churned, dead"),
        ("arpu", {"formula": "abs(revenue)"}, "kpis.yaml: kpis.arpu.formula: function calls are not allowed"),
        ("arpu", {"formula": "new_users_by_channel.tv"},
         "kpis.yaml: kpis.arpu.formula: unknown channel 'tv' in 'new_users_by_channel.tv'"),
        ("nu", {"metric": "prev.new_users"},
         "kpis.yaml: kpis.nu.metric: 'prev.new_users': prev. is only allowed in a formula"),
        ("nu", {"formula": "new_users"}, "kpis.yaml: kpis.nu: give exactly one of metric or formula"),
        ("rev", {"segment": {"channel": "paid_search"}},
         "kpis.yaml: kpis.rev.segment: metric 'revenue' is not available per channel; only new_users "
         "(as new_users_by_channel.<channel>) is split by channel today"),
        ("nu_paid", {"segment": {"country": "de"}},
         "kpis.yaml: kpis.nu_paid.segment: only channel segments are computable today (segment: {channel: <name>}); "
         "unsupported key(s): country"),
        ("nu_paid", {"segment": {"channel": "tv"}}, "kpis.yaml: kpis.nu_paid.segment.channel: unknown channel 'tv'"),
        ("nu", {"department": "sales"}, "kpis.yaml: kpis.nu.department: no owner 'sales' with level department"),
        ("nu", {"target": {"2024-13": 5}},
         "kpis.yaml: kpis.nu.target.2024-13: invalid month label '2024-13': month must be 01..12"),
        ("nu", {"target": {"2024-01": -5}}, "kpis.yaml: kpis.nu: target: targets must be positive"),
        ("nu", {"target": {"2024-01": "lots"}}, "kpis.yaml: kpis.nu.target.2024-01: expected a number, got 'lots'"),
        ("nu", {"at_risk": 0.7}, "kpis.yaml: kpis.nu: thresholds: need 0 < off_track (0.8) < at_risk (0.7)"),
        ("nu", {"grain": "fortnight"}, "kpis.yaml: kpis.nu.grain: Input should be 'day', 'week', 'month'"),
        ("nu", {"colour": "red"}, "kpis.yaml: kpis.nu.colour: unknown key"),
        ("nu", {"profile": {"weekday": [1, 1, 1]}},
         "kpis.yaml: kpis.nu.profile: weekday: needs 7 weights (Mon..Sun), got 3"),
        ("nu", {"payout": {"points": [[1.0, 1.0], [0.8, 0.5]]}},
         "kpis.yaml: kpis.nu.payout: points: attainments must be strictly increasing"),
        ("nu", {"payout": {"points": [[0.8, 0.5], [1.2, 2.0]], "cap": 1.5}},
         "kpis.yaml: kpis.nu.payout: points: multipliers must lie within floor 0 and cap 1.5"),
    ],
)
def test_kpi_faults_name_file_key_and_fault(kpi, changes, message):
    assert message in refused(variant(kpi=kpi, kpi_changes=changes))


def test_all_problems_are_reported_at_once():
    data = variant("ben", [{"kpi": "nu", "weight": 0.5}, {"kpi": "arpu", "weight": 0.4}],
                   kpi="arpu", kpi_changes={"formula": "revnue / x"})
    lines = refused(data).splitlines()
    assert len(lines) == 3
    assert all(line.startswith("kpis.yaml: ") for line in lines)


def test_packaged_spec_loads_and_has_a_stable_fingerprint(tmp_path):
    spec = load_kpis(DEFAULT_KPIS_PATH, channels=CHANNELS)
    assert {k.id for k in spec.kpis} >= {"new_users", "new_users_paid_search", "active_users", "revenue", "arpu",
                                          "arppu", "k_factor", "win_back_rate", "churn_rate", "churn_warnings"}
    assert len(spec.fingerprint) == 64
    assert load_kpis(DEFAULT_KPIS_PATH).fingerprint == spec.fingerprint
    # same numbers written differently: same fingerprint; another target: another one
    text = DEFAULT_KPIS_PATH.read_text()
    same = tmp_path / "same.yaml"
    same.write_text(text.replace("{kpi: revenue, weight: 0.5}", "{kpi: revenue, weight: '0.50'}"))
    assert load_kpis(same).fingerprint == spec.fingerprint
    other = tmp_path / "other.yaml"
    other.write_text(text.replace("target: 0.06", "target: 0.07"))
    assert load_kpis(other).fingerprint != spec.fingerprint


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_kpis(tmp_path / "nope.yaml")
    bad = tmp_path / "kpis.yaml"
    bad.write_text("kpis: [unclosed")
    with pytest.raises(ConfigError, match="kpis.yaml: not valid YAML"):
        load_kpis(bad)
    bad.write_text("- a\n")
    with pytest.raises(ConfigError, match="kpis.yaml: <root>: expected a mapping of keys, got list"):
        load_kpis(bad)


def test_unquoted_labels_are_read_as_labels():
    data = variant(kpi="nu", kpi_changes={"grain": "day", "target": yaml.safe_load("{2024-03-14: 5, default: 3}")})
    spec = build(data)
    assert spec.kpi("nu").target_for("2024-03-14") == 5
    assert spec.kpi("nu").target_for("2024-03-15") == 3
    data = variant(kpi="nu", kpi_changes={"grain": "year", "target": yaml.safe_load("{2024: 5}")})
    assert build(data).kpi("nu").target_for("2024") == 5


# --------------------------------------------------------------------------- direction and payout


@pytest.mark.parametrize(
    ("actual", "target", "direction", "expected"),
    [
        (F(120), F(100), "higher", F(6, 5)),
        (F(80), F(100), "higher", F(4, 5)),
        (F(-10), F(100), "higher", F(-1, 10)),
        (F(120), F(100), "lower", F(5, 6)),
        (F(80), F(100), "lower", F(5, 4)),
        (F(0), F(100), "lower", None),      # best case: paid at the top of the curve
        (None, F(100), "higher", None),
        (F(5), None, "higher", None),
    ],
)
def test_direction(actual, target, direction, expected):
    assert attainment(actual, target, direction) == expected


@pytest.mark.parametrize(
    ("att", "multiplier"),
    [
        ("0", "0"),
        ("0.7999", "0"),
        ("0.8", "0.5"),
        ("0.9", "0.75"),
        ("0.95", "0.875"),
        ("1.0", "1"),
        ("1.1", "1.25"),
        ("1.2", "1.5"),
        ("1.5", "1.5"),
        ("-3", "0"),
        (None, "1.5"),  # best case
    ],
)
def test_default_payout_curve(att, multiplier):
    assert payout(att, DEFAULT_CURVE) == F(multiplier)
    assert payout(att) == F(multiplier)


def test_custom_payout_curve_with_floor_and_cap():
    curve = Curve(points=((F(1, 2), F(1, 4)), (F(1), F(1)), (F(3, 2), F(2))), floor=F(1, 10), cap=F(7, 4))
    assert payout("0.4", curve) == F(1, 10)         # floor below the first point
    assert payout("0.75", curve) == F(5, 8)
    assert payout("1.25", curve) == F(3, 2)
    assert payout("1.4", curve) == F(7, 4)          # capped before the last point
    assert payout("9", curve) == F(7, 4)


def test_spec_level_payout_curve_reaches_every_kpi():
    data = copy.deepcopy(BASE) | {"payout": {"points": [[0.9, 0.5], [1.0, 1.0]], "floor": 0, "cap": 1}}
    spec = build(data)
    m = metrics(new_users=95)
    p = CAL.parse("month", "2024-02")
    r = evaluate_kpi(spec.kpi("nu"), m, None, p, p.end_ms, CAL, True)
    assert r.multiplier == F(3, 4)


def test_lower_kpi_at_zero_is_best():
    spec = build()
    p = CAL.parse("month", "2024-02")
    r = evaluate_kpi(spec.kpi("churn"), metrics(churned=0), metrics(population={"active": 100, "silent": 0,
                     "sleeping": 0, "churned": 0, "dead": 0}), p, p.end_ms, CAL, True)
    assert r.actual == 0 and r.attainment is None
    assert (r.multiplier, r.status, r.credited_attainment) == (F(3, 2), "on_track", F(6, 5))
    assert r.note.startswith("best")


# --------------------------------------------------------------------------- scores

KINDS = {"c1": "committed", "c2": "committed", "s1": "stretch", "s2": "stretch"}


def result(kpi_id, multiplier, kind=None, att=None):
    kind = kind or KINDS.get(kpi_id, "committed")
    m = None if multiplier is None else F(multiplier)
    a = m if att is None else F(att)
    return KpiResult(kpi=kpi_id, period="2024-02", grain="month", kind=kind, direction="higher", closed=True,
                     actual=None if m is None else F(1), target=F(1), attainment=a, expected_progress=F(1),
                     projected_value=None, projected_attainment=a, status="on_track" if m is not None else "no_data",
                     multiplier=m, credited_attainment=a)


def owner(weights):
    return Owner(id="o", name="O", level="person", parent="x",
                 kpis=tuple(Holding(kpi=k, weight=w) for k, w in weights.items()))


def test_score_owner_committed_only():
    o = owner({"c1": "0.6", "c2": "0.4"})
    s = score_owner(o, {"c1": result("c1", "1.25", att="1.1"), "c2": result("c2", "0.5", att="0.8")})
    assert s.multiplier == F(6, 10) * F(5, 4) + F(4, 10) * F(1, 2) == F(19, 20)
    assert s.score == F(6, 10) * F(11, 10) + F(4, 10) * F(4, 5)
    assert [c.contribution for c in s.contributions] == [F(3, 4), F(1, 5)]


def test_score_owner_stretch_rule():
    o = owner({"c1": "0.4", "c2": "0.4", "s1": "0.2"})
    good = score_owner(o, {"c1": result("c1", 1), "c2": result("c2", "0.5"), "s1": result("s1", "1.5")})
    # committed weights renormalised to 0.5/0.5; stretch adds 0.2 x (1.5 - 1)
    assert good.committed == F(3, 4)
    assert good.stretch_bonus == F(1, 10)
    assert good.multiplier == F(17, 20)
    bad = score_owner(o, {"c1": result("c1", 1), "c2": result("c2", "0.5"), "s1": result("s1", 0)})
    assert bad.multiplier == bad.committed == F(3, 4)


def test_score_owner_leaves_out_kpis_without_value():
    o = owner({"c1": "0.5", "c2": "0.5"})
    s = score_owner(o, {"c1": result("c1", "1.2"), "c2": result("c2", None)})
    assert s.multiplier == F(6, 5)
    assert [c.counted for c in s.contributions] == [True, False]
    none = score_owner(o, {"c1": result("c1", None), "c2": result("c2", None)})
    assert none.multiplier is None and none.score is None
    with pytest.raises(KeyError, match="no result for KPI"):
        score_owner(o, {"c1": result("c1", 1)})


MULT = st.fractions(min_value=0, max_value=F(3, 2), max_denominator=1000)


@settings(max_examples=200, deadline=None)
@given(
    committed=st.lists(st.tuples(st.integers(1, 50), MULT), min_size=1, max_size=4),
    stretch=st.lists(st.tuples(st.integers(1, 50), st.one_of(st.none(), MULT)), min_size=1, max_size=3),
)
def test_stretch_kpis_never_lower_a_score(committed, stretch):
    total = sum(w for w, _ in committed) + sum(w for w, _ in stretch)
    results = {f"c{i}": result(f"c{i}", m, kind="committed") for i, (_, m) in enumerate(committed)}
    results |= {f"s{i}": result(f"s{i}", m, kind="stretch") for i, (_, m) in enumerate(stretch)}
    # exact weights that sum to 1: integers over a power of ten
    denom = 10 ** 6
    parts = [w for w, _ in committed] + [w for w, _ in stretch]
    scaled = [p * denom // total for p in parts]
    scaled[0] += denom - sum(scaled)
    keys = [f"c{i}" for i in range(len(committed))] + [f"s{i}" for i in range(len(stretch))]
    weights = {k: str(Decimal(v) / denom) for k, v in zip(keys, scaled) if v > 0}
    if not any(k.startswith("c") for k in weights):
        return
    with_stretch = score_owner(owner(weights), {k: results[k] for k in weights})
    committed_only = score_owner(owner({k: w for k, w in weights.items() if k.startswith("c")}),
                                 {k: results[k] for k in weights if k.startswith("c")})
    assert with_stretch.committed == committed_only.multiplier
    assert with_stretch.multiplier >= committed_only.multiplier
    assert with_stretch.score >= committed_only.score
    # a worse stretch result never takes anything away either
    worse = {k: (result(k, 0, kind="stretch") if k.startswith("s") else r) for k, r in results.items() if k in weights}
    assert score_owner(owner(weights), worse).multiplier == committed_only.multiplier


# --------------------------------------------------------------------------- progress, projection, status


WORKDAYS = Profile(weekday=(1, 1, 1, 1, 1, 0, 0))


@pytest.mark.parametrize(
    ("now", "profile", "expected"),
    [
        ("2024-03-11T00:00:00+00:00", WORKDAYS, F(0)),          # Monday 00:00: week starts
        ("2024-03-13T00:00:00+00:00", WORKDAYS, F(2, 5)),       # Wednesday 00:00: Mon+Tue done
        ("2024-03-13T12:00:00+00:00", WORKDAYS, F(1, 2)),       # half of Wednesday too
        ("2024-03-16T10:00:00+00:00", WORKDAYS, F(1)),          # Saturday weighs nothing
        ("2024-03-17T23:59:59+00:00", WORKDAYS, F(1)),
        ("2024-03-18T00:00:00+00:00", WORKDAYS, F(1)),          # after the end
        ("2024-03-13T00:00:00+00:00", None, F(2, 7)),           # no profile: elapsed time
        ("2024-03-13T00:00:00+00:00", Profile(weekday=(2, 1, 1, 1, 1, 1, 1)), F(3, 8)),
    ],
)
def test_expected_progress_weekday_profile(now, profile, expected):
    week = CAL.parse("week", "2024-W11")                        # Mon 2024-03-11 .. Sun 2024-03-17
    assert expected_progress(week, ms(now), CAL, profile) == expected


def test_expected_progress_day_of_month_profile():
    feb = CAL.parse("month", "2024-02")                         # 29 days
    profile = Profile(day_of_month={1: 11}, default=1)          # the 1st weighs as much as 11 other days
    assert expected_progress(feb, ms("2024-02-02T00:00:00+00:00"), CAL, profile) == F(11, 39)
    assert expected_progress(feb, ms("2024-02-02T00:00:00+00:00"), CAL, None) == F(1, 29)


def test_expected_progress_follows_local_days():
    berlin = Calendar("Europe/Berlin")
    day = berlin.parse("day", "2024-03-31")                     # 23 hours
    noon = ms("2024-03-31T12:00:00+02:00")
    assert expected_progress(day, noon, berlin) == F(11, 23)


@pytest.mark.parametrize(
    ("projected", "status"),
    [("1.3", "on_track"), ("0.95", "on_track"), ("0.9499", "at_risk"), ("0.8", "at_risk"),
     ("0.7999", "off_track"), ("0", "off_track"), (None, "no_data")],
)
def test_status_thresholds(projected, status):
    assert status_for(None if projected is None else F(projected)) == status


def test_status_uses_the_kpis_own_thresholds():
    assert status_for(F(9, 10), at_risk="0.9", off_track="0.75") == "on_track"
    assert status_for(F(3, 4), at_risk="0.9", off_track="0.75") == "at_risk"


def test_open_period_projects_additive_metrics_linearly():
    spec = build()
    feb = CAL.parse("month", "2024-02")
    now = ms("2024-02-15T12:00:00+00:00")                       # 14.5 of 29 days: half
    r = evaluate_kpi(spec.kpi("nu"), metrics(new_users=45), None, feb, now, CAL, closed=False)
    assert r.expected_progress == F(1, 2)
    assert r.projected_value == 90 and r.projected_attainment == F(9, 10)
    assert r.attainment == F(45, 100)
    assert r.status == "at_risk"
    assert r.multiplier == payout(F(9, 10))                     # a forecast while open
    assert r.to_dict()["projected_value"] == "90"


def test_open_period_projects_ratios_as_is():
    spec = build()
    feb = CAL.parse("month", "2024-02")
    now = ms("2024-02-08T00:00:00+00:00")
    r = evaluate_kpi(spec.kpi("arpu"), metrics(revenue="30.00", active_users=8), None, feb, now, CAL, closed=False)
    assert r.actual == r.projected_value == F(15, 4)
    assert r.projected_attainment == F(15, 16)
    assert r.status == "at_risk"


def test_open_period_projects_flow_over_previous_stock_linearly():
    spec = build()
    feb = CAL.parse("month", "2024-02")
    now = ms("2024-02-15T12:00:00+00:00")                       # half of February
    prev = metrics(population={"active": 1000, "silent": 0, "sleeping": 0, "churned": 0, "dead": 0})
    r = evaluate_kpi(spec.kpi("churn"), metrics(churned=30), prev, feb, now, CAL, closed=False)
    assert r.actual == F(3, 100) and r.projected_value == F(6, 100)
    assert r.projected_attainment == F(5, 6) and r.status == "at_risk"


def test_closed_period_and_missing_values():
    spec = build()
    feb = CAL.parse("month", "2024-02")
    r = evaluate_kpi(spec.kpi("churn"), metrics(churned=3), None, feb, feb.end_ms, CAL, closed=True)
    assert (r.actual, r.status, r.multiplier) == (None, "no_data", None)
    data = variant(kpi="nu", kpi_changes={"target": {"2024-01": 10}})
    r = evaluate_kpi(build(data).kpi("nu"), metrics(new_users=5), None, feb, feb.end_ms, CAL, closed=True)
    assert (r.target, r.status) == (None, "no_target")
    with pytest.raises(ValueError, match="grain quarter"):
        evaluate_kpi(spec.kpi("orders_q"), metrics(), None, feb, feb.end_ms, CAL, True)


def test_segmented_kpi_reads_its_channel():
    spec = build()
    m = metrics(new_users=30, new_users_by_channel={"paid_search": 12, "organic": 18})
    assert kpi_actual(spec.kpi("nu_paid"), m, None) == 12
    assert kpi_actual(spec.kpi("nu_social"), m, None) == 0


def test_results_serialise_with_fixed_decimals():
    spec = build()
    feb = CAL.parse("month", "2024-02")
    r = evaluate_kpi(spec.kpi("rev"), metrics(revenue="1234.50"), None, feb, feb.end_ms, CAL, True).to_dict()
    assert (r["actual"], r["target"], r["attainment"], r["multiplier"]) == ("1234.50", "1000.00", "1.2345", "1.5000")
    assert fmt(F(1, 8), 2) == "0.12" and fmt(F(3, 8), 2) == "0.38"     # half to even
    assert fmt(F(-1, 3)) == "-0.3333" and fmt(F(-1, 100000)) == "0.0000"
    assert fmt(F(7), 0) == "7"


# --------------------------------------------------------------------------- target suggestion


@pytest.mark.parametrize(
    ("history", "kwargs", "value"),
    [
        ([1000, 1200, 1400, 1600], {}, Decimal("1260")),                         # mean(1200,1400,1600) - 10 %
        ([1000, 1200, 1400, 1600], {"direction": "lower"}, Decimal("1540")),
        ([1000, 1200, 1400, 1600], {"seasonal_reference": 1.1}, Decimal("1386")),
        ([1000, 1200, 1400, 1600], {"n": 1, "haircut": 0}, Decimal("1600")),
        ([900, 1100], {}, Decimal("900")),                                       # fewer than n: all used
        (["0.0625", "0.0580", "0.0610"], {"direction": "lower"}, Decimal("0.0666")),  # 0.06655: half to even
        (["100.00", "110.00", "121.00"], {"haircut": "0.05"}, Decimal("104.82")),
        ([1000, 1001, 1002], {}, Decimal("901")),                                # 900.9
        ([1005], {}, Decimal("904")),                                            # 904.5: half to even
        ([1015], {}, Decimal("914")),                                            # 913.5: half to even
    ],
)
def test_suggest_target(history, kwargs, value):
    assert suggest_target(history, **kwargs).value == value


def test_suggest_target_yaml_snippet():
    s = suggest_target([4000, 4200, 4350], label="2024-04", kpi_id="new_users")
    assert s.value == Decimal("3765") and s.mean == F(12550, 3) and s.periods_used == 3
    assert yaml.safe_load(s.yaml) == {"target": {"2024-04": 3765}}
    assert s.yaml.startswith("# new_users: mean of the last 3 period(s) 4183.3333, -10 % (higher is better)")
    plain = suggest_target([10, 20, 30], seasonal_reference="1.5")
    assert yaml.safe_load(plain.yaml) == {"target": 27}
    with pytest.raises(ValueError, match="no values"):
        suggest_target([])
    with pytest.raises(ValueError, match="haircut"):
        suggest_target([1], haircut=1)


# --------------------------------------------------------------------------- numbers read exactly from the YAML text


def _spec_file(tmp_path, ben_weights: list[str], churn_extra: str = ""):
    """BASE as a YAML file, Ben holding nu/arpu/nu_paid... with ``ben_weights`` written as is."""
    data = variant("ben", [{"kpi": k, "weight": f"@W{i}@"} for i, k in enumerate(("nu", "arpu", "nu_paid"))
                           if i < len(ben_weights)])
    text = yaml.safe_dump(data, sort_keys=False)
    for i, w in enumerate(ben_weights):
        text = text.replace(f"'@W{i}@'", w)
    text = text.replace("  target: 0.05\n", f"  target: 0.05\n{churn_extra}")
    path = tmp_path / "kpis.yaml"
    path.write_text(text)
    return path


def test_weights_are_read_from_the_yaml_text_not_through_a_float(tmp_path):
    # as a float, 0.2000000000000000001 is 0.2 and the sum "is" 1
    assert 0.5 + 0.3 + float("0.2000000000000000001") == 1.0
    with pytest.raises(ConfigError) as err:
        load_kpis(_spec_file(tmp_path, ["0.5", "0.3", "0.2000000000000000001"]), channels=CHANNELS)
    assert str(err.value) == (f"{tmp_path / 'kpis.yaml'}: owners.ben.kpis: weights sum to 1.0000000000000000001, "
                              f"must be exactly 1")
    spec = load_kpis(_spec_file(tmp_path, ["0.1", "0.2", "0.7"]), channels=CHANNELS)
    weights = [h.weight for h in spec.owner("ben").kpis]
    assert weights == [Decimal("0.1"), Decimal("0.2"), Decimal("0.7")]
    assert sum(map(F, weights)) == 1


def test_targets_thresholds_and_curve_are_exact_decimals(tmp_path):
    extra = ("  at_risk: 0.9000000000000000001\n  off_track: 0.8\n"
             "  payout: {points: [[0.8, 0.5], [1.0000000000000000001, 1], [1.2, 1.5]], floor: 0, cap: 1.5}\n")
    path = _spec_file(tmp_path, ["1"], extra)
    text = path.read_text().replace("target: 0.05", "target: 0.0500000000000000001")
    path.write_text(text)
    k = load_kpis(path, channels=CHANNELS).kpi("churn")
    assert k.target.default == Decimal("0.0500000000000000001")
    assert k.at_risk == Decimal("0.9000000000000000001")
    assert k.payout.points[1][0] == Decimal("1.0000000000000000001")
    assert all(isinstance(x, Decimal) for p in k.payout.points for x in p)
    # evaluation takes the Decimals exactly: attainment (lower is better) = target / actual
    feb = CAL.parse("month", "2024-02")
    prev = metrics(population={"active": 100, "silent": 0, "sleeping": 0, "churned": 0, "dead": 0})
    r = evaluate_kpi(k, metrics(churned=5), prev, feb, feb.end_ms, CAL, closed=True)
    assert r.actual == F(5, 100)
    assert r.attainment == F(Decimal("0.0500000000000000001")) / F(5, 100)
    assert r.status == "on_track"


def test_a_key_given_twice_in_the_spec_is_refused_with_path_and_line(tmp_path):
    path = _spec_file(tmp_path, ["1"])
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == "target: 0.05")
    lines.insert(at + 1, lines[at].replace("0.05", "0.5"))  # the last one would silently win
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_kpis(path, channels=CHANNELS)
    assert str(err.value) == f"{path}: kpis.churn.target: duplicate key at line {at + 2} (first at line {at + 1})"
