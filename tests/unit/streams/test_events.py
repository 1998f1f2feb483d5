"""The event contract: every rejection reason, exact money, timestamps, poison pills."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from kpimon.agents.core.batch import Record
from kpimon.agents.core.batch import decode as decode_record
from kpimon.agents.core.batch import encode as encode_record
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.worker.recovery import Replayer, StateLogError
from kpimon.config.settings import ConfigError, from_mapping
from kpimon.streams.events import (
    EARLIEST_TS,
    MAX_AMOUNT_MINOR,
    MAX_DEPTH,
    MIN_TS,
    Decoder,
    Reason,
    Rejected,
    format_money,
    parse_instant,
)
from tests.factories import events_factory, ms, rfc3339, settings_factory, to_lines
from tests.pure_pipeline import partitioner, run_pipeline
from tests.reference import reference_report

OK = b'"event_id": "e1", "user_id": "u1", "type": "login", "ts": "2024-03-13T10:21:14Z"'


def obj(extra: str = "", base: bytes = OK) -> bytes:
    return b"{" + base + (b", " + extra.encode() if extra else b"") + b"}"


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        (b"not json", Reason.NOT_JSON, "JSON is malformed"),
        (b'{"a": 1', Reason.NOT_JSON, "truncated"),
        (b"[1, 2]", Reason.NOT_OBJECT, "Expected `object`, got `array`"),
        (b'"text"', Reason.NOT_OBJECT, "Expected `object`, got `str`"),
        (b'{"user_id": "u", "type": "x", "ts": 1704067200000}', Reason.MISSING_FIELD, "`event_id`"),
        (b'{"event_id": "", "user_id": "u", "type": "x", "ts": 1704067200000}', Reason.INVALID_FIELD,
         "length >= 1 - at `$.event_id`"),
        (b'{"event_id": "e", "user_id": 7, "type": "x", "ts": 1704067200000}', Reason.INVALID_FIELD,
         "at `$.user_id`"),
        (b'{"event_id": "' + b"e" * 129 + b'", "user_id": "u", "type": "x", "ts": 1704067200000}',
         Reason.INVALID_FIELD, "length <= 128"),
        (b'{"event_id": "e", "user_id": "u", "type": "x", "ts": "2024-03-13T10:21:14"}', Reason.BAD_TIMESTAMP,
         "timezone"),
        (b'{"event_id": "e", "user_id": "u", "type": "x", "ts": "yesterday"}', Reason.BAD_TIMESTAMP, "RFC3339"),
        (b'{"event_id": "e", "user_id": "u", "type": "x", "ts": 1.5}', Reason.BAD_TIMESTAMP, "got `float`"),
        (b'{"event_id": "e", "user_id": "u", "type": "x", "ts": 1710325274}', Reason.BAD_TIMESTAMP,
         ("ts 1710325274 is before min_epoch_ms 946684800000 (2000-01-01T00:00:00Z): an integer ts is epoch "
          "milliseconds; as epoch seconds it would be 2024-03-13T10:21:14Z")),
        (obj('"amount": "-1"'), Reason.BAD_AMOUNT, "negative"),
        (obj('"amount": "abc"'), Reason.BAD_AMOUNT, "amount 'abc' is not a decimal number"),
        (obj('"amount": "NaN"'), Reason.BAD_AMOUNT, "amount 'NaN' is not a decimal number"),
        (obj('"amount": true'), Reason.BAD_AMOUNT, "got `bool`"),
        (obj('"amount": "1.005"'), Reason.BAD_AMOUNT, "more than 2 decimal places"),
        (b'{"event_id": "e", "user_id": "u", "type": "purchase", "ts": 1704067200000}', Reason.MISSING_FIELD,
         "`amount` is required for purchase"),
        (obj('"pad": "' + "x" * 70_000 + '"'), Reason.TOO_LARGE, "the limit is 65536"),
    ],
    ids=["garbage", "truncated", "array", "string", "no-event-id", "empty-id", "int-user", "long-id", "naive-ts",
         "word-ts", "float-ts", "seconds-ts", "negative", "not-a-number", "nan", "bool", "sub-cent",
         "purchase-without-amount", "too-large"],
)
def test_rejections_have_a_reason_and_a_detail(raw, reason, detail):
    with pytest.raises(Rejected) as err:
        Decoder().decode(raw)
    assert err.value.reason is reason
    assert detail in err.value.detail


def test_future_events_beyond_the_horizon_are_rejected():
    dec = Decoder(max_ts=1_704_067_200_000)
    assert dec.decode(b'{"event_id": "e", "user_id": "u", "type": "x", "ts": 1704067200000}').ts == 1_704_067_200_000
    with pytest.raises(Rejected, match="too far in the future") as err:
        dec.decode(b'{"event_id": "e", "user_id": "u", "type": "x", "ts": 1704067200001}')
    assert err.value.reason is Reason.BAD_TIMESTAMP


@pytest.mark.parametrize(
    ("amount", "minor", "text"),
    [('"0.10"', 10, "0.10"), ("0.2", 20, "0.20"), ('"19.99"', 1999, "19.99"), ("1e3", 100000, "1000.00"),
     ('"0"', 0, "0.00"), ("1234567890123.89", 123456789012389, "1234567890123.89"),
     ("9999999999999.99", MAX_AMOUNT_MINOR, "9999999999999.99")],
)
def test_amounts_are_exact_minor_units(amount, minor, text):
    ev = Decoder().decode(obj(f'"type2": 1, "amount": {amount}'))
    assert ev.amount == minor
    assert format_money(ev.amount) == text


def test_timestamps_with_offsets_and_epoch_ms_agree_and_unknown_fields_are_ignored():
    a = Decoder().decode(b'{"event_id": "e", "user_id": "u", "type": "x", "ts": "2024-03-13T18:21:14.5+08:00",'
                         b' "whatever": {"nested": [1]}}')
    assert a.ts == parse_instant("2024-03-13T10:21:14.500Z") == 1_710_325_274_500
    assert MIN_TS == parse_instant("2000-01-01T00:00:00Z")
    assert EARLIEST_TS == parse_instant("1970-01-01T00:00:00Z") == 0


# --------------------------------------------------------------------------- poison pills (issue 7)

PURCHASE = b'"event_id": "e1", "user_id": "u1", "type": "purchase", "ts": "2024-03-13T10:21:14Z"'


def purchase(extra: str | bytes) -> bytes:
    return b"{" + PURCHASE + b", " + (extra.encode() if isinstance(extra, str) else extra) + b"}"


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        # Each raised out of the decoder (or, for 1e18, out of the state-log encoder) before.
        (purchase(b'"amount": 1, "x": ' + b"[" * 10_000 + b"]" * 10_000), Reason.NOT_JSON,
         "JSON nested more than 128 levels deep"),
        (purchase('"amount": "1e999999999"'), Reason.BAD_AMOUNT,
         "amount 1e999999999 is too large: at most 9999999999999.99 (999999999999999 minor units)"),
        (purchase(b'"amount": 1, "note": "caf\xe9"'), Reason.NOT_JSON,
         "invalid UTF-8 at byte"),
        (purchase('"amount": "1e18"'), Reason.BAD_AMOUNT, "amount 1e18 is too large"),
        # Relatives.
        (purchase('"amount": 1e400'), Reason.BAD_AMOUNT, "is too large"),
        (purchase('"amount": "1e-999999999"'), Reason.BAD_AMOUNT, "has more than 2 decimal places"),
        (purchase('"amount": 1e99999999999999999999'), Reason.BAD_AMOUNT, "exponent beyond any supported range"),
        (purchase('"amount": "1e-99999999999999999999"'), Reason.BAD_AMOUNT, "exponent beyond any supported range"),
        (purchase('"amount": ' + "[" * 5000 + "]" * 5000), Reason.NOT_JSON, "nested more than 128 levels"),
        (purchase('"amount": 1, "x": ' + "[" * 20_000), Reason.NOT_JSON, "nested more than 128 levels"),
        (purchase('"amount": 1, "x": ' + '{"a":' * 5000 + "0" + "}" * 5000), Reason.NOT_JSON,
         "nested more than 128 levels"),
        (purchase(b'"amount": 1, "x": "\xed\xa0\x80"'),
         Reason.NOT_JSON, "invalid UTF-8"),  # a UTF-8-encoded surrogate
        (purchase('"amount": 1' + "0" * 5000), Reason.BAD_AMOUNT, "out of range"),
        (purchase('"amount": "0.0100000000000000000000000000001"'), Reason.BAD_AMOUNT,
         "more than 2 decimal places"),  # used to be rounded to 1 minor unit by the 28-digit context
    ],
    ids=["deep-extra", "overflow", "invalid-utf8", "1e18", "1e400", "tiny-exponent", "huge-exponent-number",
         "tiny-exponent-string", "deep-amount", "deep-unbalanced", "deep-objects", "utf8-surrogate", "5000-digits",
         "beyond-28-digits"],
)
def test_poison_pills_are_rejected_with_a_stable_reason(raw, reason, detail):
    assert len(raw) < 64 * 1024
    with pytest.raises(Rejected) as err:
        Decoder().decode(raw)
    assert err.value.reason is reason
    assert detail in err.value.detail


def test_nesting_is_judged_by_depth_not_by_brackets_or_size():
    def nested(depth: int) -> bytes:
        return obj('"x": ' + "[" * depth + "]" * depth)
    assert Decoder().decode(nested(MAX_DEPTH - 1)).event_id == "e1"  # the event object itself is one level
    with pytest.raises(Rejected, match="nested more than 128"):
        Decoder().decode(nested(MAX_DEPTH))
    def objects(depth: int) -> bytes:  # a sibling array at every level: no long runs of brackets
        return obj('"x": ' + '{"s": [1], "a": ' * (depth - 1) + '{"a": 0}' + "}" * (depth - 1))
    assert Decoder().decode(objects(MAX_DEPTH - 1)).event_id == "e1"
    with pytest.raises(Rejected, match="nested more than 128"):
        Decoder().decode(objects(MAX_DEPTH))
    # many brackets, little depth; brackets inside strings do not count
    assert Decoder().decode(obj('"x": [' + ",".join(["[{}]"] * 5000) + "]")).event_id == "e1"
    assert Decoder().decode(obj('"x": "' + "[" * 20_000 + '"')).event_id == "e1"


def test_the_largest_amount_survives_the_state_log_and_sums():
    ev = Decoder().decode(obj('"type2": 1, "amount": "9999999999999.99"'))
    assert ev.amount == MAX_AMOUNT_MINOR
    rec = Record(0, 1, None, None, [ev] * 3, {}, 0, 0)
    assert decode_record(encode_record(rec)) == rec
    assert MAX_AMOUNT_MINOR < 2**53 and 9_000 * MAX_AMOUNT_MINOR < 2**63  # exact in doubles; sums fit int64


@pytest.mark.parametrize(
    ("field", "value"),
    [("event_id", r"e\u0000"), ("user_id", r"u\n1"), ("user_id", "u\x7f"), ("type", r"log\tin"),
     ("channel", r"organic\r"), ("referrer_id", r"\u0085r"), ("user_id", "u\x85"), ("user_id", r"\u001b[31m")],
    ids=["nul", "newline", "raw-del", "tab", "carriage-return", "escaped-c1", "raw-c1", "ansi-escape"],
)
def test_control_characters_in_ids_are_invalid_fields(field, value):
    text = value  # the JSON text: escapes as written; DEL and U+0085 raw
    body = {"event_id": '"e1"', "user_id": '"u1"', "type": '"login"', "ts": "1710325274000"}
    body[field] = '"' + text + '"'
    raw = ("{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}").encode()
    with pytest.raises(Rejected) as err:
        Decoder().decode(raw)
    assert err.value.reason is Reason.INVALID_FIELD
    assert f"`{field}` contains the control character U+" in err.value.detail


def test_other_unicode_and_escapes_in_ids_are_fine():
    raw = (r'{"event_id": "e\u00e9\/1", "user_id": "ü 用户 \ud83d\ude00", "type": "login", "ts": 1710325274000,'
           r' "channel": "org\u00a0anic", "note": "line1\nline2\u0000"}')
    ev = Decoder().decode(raw.encode())
    assert (ev.event_id, ev.user_id, ev.channel) == ("eé/1", "ü 用户 \U0001F600", "org\u00a0anic")


# --------------------------------------------------------------------------- amount forms (issue item 6)

@pytest.mark.parametrize(
    ("amount", "minor"),
    [('"5.000"', 500), ("5.000", 500), ('"5.10"', 510), ('"-0"', 0), ("-0", 0), ("-0.0", 0), ('"0.00"', 0),
     ('"0e999999999"', 0), ('"1E+3"', 100_000), ("1E+3", 100_000), ('"25e-1"', 250), ("25e-1", 250), ("7", 700),
     ('"5.0000000000000000000000000000000000000000000000"', 500)],
)
def test_amount_forms_that_are_accepted(amount, minor):
    """Trailing zeros are exact; -0 is zero; a string holds a JSON number, nothing else."""
    assert Decoder().decode(purchase(f'"amount": {amount}')).amount == minor


@pytest.mark.parametrize(
    ("amount", "detail"),
    [('"+5"', "not a decimal number"), ('"  5 "', "not a decimal number"), ('" 5"', "not a decimal number"),
     ('"5 "', "not a decimal number"), ('".5"', "not a decimal number"), ('"5."', "not a decimal number"),
     ('"007"', "not a decimal number"), ('"1_000"', "not a decimal number"), ('"\u0661"', "not a decimal number"),
     ('"Infinity"', "not a decimal number"), ('"-Infinity"', "not a decimal number"), ('"sNaN"', "not a decimal"),
     ('""', "not a decimal number"), ('"0x10"', "not a decimal number"), ('"5,00"', "not a decimal number"),
     ('"5.001"', "more than 2 decimal places"), ("5.001", "more than 2 decimal places"),
     ('"-0.01"', "negative"), ("-0.01", "negative"), ("-1", "negative"),
     ("10000000000000", "too large"), ('"10000000000000.00"', "too large"), ("1e13", "too large"),
     ("[1]", "got `array`"), ('{"value": 1}', "got `object`"), ("false", "got `bool`")],
)
def test_amount_forms_that_are_rejected(amount, detail):
    with pytest.raises(Rejected) as err:
        Decoder().decode(purchase(f'"amount": {amount}'))
    assert err.value.reason is Reason.BAD_AMOUNT
    assert detail in err.value.detail


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "+5", ".5", "007", "5."])
def test_amounts_that_are_not_json_numbers_make_the_event_not_json(token):
    with pytest.raises(Rejected) as err:
        Decoder().decode(purchase(f'"amount": {token}'))
    assert err.value.reason is Reason.NOT_JSON


def test_the_amount_bound_is_in_minor_units_for_every_currency():
    yen = Decoder(decimals=0)
    assert yen.decode(purchase('"amount": 999999999999999')).amount == MAX_AMOUNT_MINOR
    assert yen.decode(purchase('"amount": "5.0"')).amount == 5
    with pytest.raises(Rejected, match="too large: at most 999999999999999 "):
        yen.decode(purchase('"amount": 1000000000000000'))
    micro = Decoder(decimals=6)
    assert micro.decode(purchase('"amount": "999999999.999999"')).amount == MAX_AMOUNT_MINOR
    with pytest.raises(Rejected, match="too large: at most 999999999.999999 "):
        micro.decode(purchase('"amount": 1000000000'))


# --------------------------------------------------------------------------- history before 2000 (issue item 3)

def test_rfc3339_history_before_2000_is_accepted_down_to_1970():
    dec = Decoder()
    assert dec.decode(obj(base=b'"event_id": "e", "user_id": "u", "type": "login", "ts": "1995-06-01T12:00:00+02:00"')
                      ).ts == ms("1995-06-01T10:00:00Z") < MIN_TS
    assert dec.decode(obj(base=b'"event_id": "e", "user_id": "u", "type": "x", "ts": "1970-01-01T01:00:00+01:00"')
                      ).ts == 0
    with pytest.raises(Rejected) as err:
        dec.decode(obj(base=b'"event_id": "e", "user_id": "u", "type": "x", "ts": "1969-12-31T23:59:59.999Z"'))
    assert err.value.reason is Reason.BAD_TIMESTAMP
    assert "before 1970-01-01T00:00:00Z, the earliest instant kpimon accepts" in err.value.detail


def test_integer_ts_floor_is_min_epoch_ms_and_the_detail_says_what_was_meant():
    ts_1990 = ms("1990-03-01T00:00:00Z")
    line = b'{"event_id": "e", "user_id": "u", "type": "x", "ts": %d}'
    with pytest.raises(Rejected) as err:
        Decoder().decode(line % ts_1990)
    assert err.value.reason is Reason.BAD_TIMESTAMP
    assert err.value.detail.startswith(f"ts {ts_1990} is before min_epoch_ms 946684800000 (2000-01-01T00:00:00Z)")
    assert "as epoch seconds" not in err.value.detail  # as seconds it would be 2100+: no hint
    assert Decoder(min_epoch_ms=ms("1980-01-01T00:00:00Z")).decode(line % ts_1990).ts == ts_1990
    with pytest.raises(Rejected, match="as epoch seconds it would be 2023-11-14T22:13:20Z"):
        Decoder().decode(line % 1_700_000_000)
    with pytest.raises(Rejected, match="as epoch microseconds it would be 2023-11-14T22:13:20Z"):
        Decoder().decode(line % 1_700_000_000_000_000)
    with pytest.raises(Rejected, match="before min_epoch_ms 0 "):
        Decoder(min_epoch_ms=0).decode(line % -1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (631152000000, 631152000000), ("1990-01-01T00:00:00Z", 631152000000),
     ("631152000000", 631152000000), (yaml.safe_load("v: 1990-01-01T01:00:00+01:00")["v"], 631152000000)],
)
def test_min_epoch_ms_setting(value, expected):
    assert from_mapping({"min_epoch_ms": value}, "k.yaml", env={}).min_epoch_ms == expected


@pytest.mark.parametrize(
    ("value", "fault"),
    [(-1, "must be between 0 (1970-01-01)"), (True, "expected epoch milliseconds or an RFC 3339 instant"),
     ("yesterday", "expected epoch milliseconds"), (1.5, "expected epoch milliseconds"),
     (dt.date(2000, 1, 1), "2000-01-01: no offset"), ("1969-12-31T00:00:00Z", "must be between 0")],
)
def test_min_epoch_ms_setting_errors(value, fault):
    with pytest.raises(ConfigError) as err:
        from_mapping({"min_epoch_ms": value}, "k.yaml", env={})
    assert str(err.value).startswith("k.yaml: min_epoch_ms: ")
    assert fault in str(err.value)


def test_the_worker_decoder_uses_min_epoch_ms():
    from kpimon.agents.tools.backfill import scan_max_ts
    from kpimon.agents.worker.ingest import IngestService

    settings = settings_factory(min_epoch_ms="1980-01-01T00:00:00Z", redis={"enabled": False})
    assert IngestService(settings).decoder.min_epoch_ms == ms("1980-01-01T00:00:00Z")
    line = b'{"event_id": "e", "user_id": "u", "type": "x", "ts": %d}' % ms("1990-03-01T00:00:00Z")
    assert scan_max_ts([line]) is None
    assert scan_max_ts([line], min_epoch_ms=settings.min_epoch_ms) == ms("1990-03-01T00:00:00Z")


def _history(start: str) -> list[dict]:
    """Three users over a year end: signups, purchases, refunds, a long silence and a return."""
    ev = events_factory("h")
    t = ms(start)
    day = 86_400_000
    return [
        ev("ann", "signup", rfc3339(t), channel="organic"),
        ev("ann", "purchase", rfc3339(t + day, 60), amount="19.99"),
        ev("bob", "signup", rfc3339(t + 2 * day, -300), channel="paid_search", referrer_id="ann"),
        ev("bob", "purchase", rfc3339(t + 3 * day), amount="5.000"),
        ev("bob", "refund", rfc3339(t + 4 * day), amount="1.50"),
        ev("cy", "login", rfc3339(t + 5 * day)),
        ev("ann", "login", rfc3339(t + 20 * day)),  # back after 19 days: churned (8d) and won back
        ev("cy", "invite", rfc3339(t + 21 * day)),
    ]


@pytest.mark.parametrize("start", ["1995-12-20T08:00:00Z", "1970-01-01T00:00:00Z"])
def test_the_engine_reports_history_from_before_2000_in_its_own_periods(start):
    settings = settings_factory()
    events = _history(start)
    until = ms(start) + 45 * 86_400_000
    report = run_pipeline(to_lines(events), settings, 2, until)
    assert not report.totals["rejected"] and report.totals["accepted"] == len(events)
    assert dict(report) == reference_report(events, settings, until, partition_of=partitioner(2))
    if start.startswith("1995"):
        assert report[("year", "1995")]["revenue"] == "23.49"  # purchases minus refunds
        assert report[("year", "1995")]["new_users"] == 2
        assert report[("month", "1996-01")]["won_back"] == 2  # ann and cy, back after 19 and 16 days
        assert report[("day", "1995-12-21")]["orders"] == 1
        assert report[("quarter", "1995-Q4")]["refunds"] == "1.50"
    else:
        assert report[("day", "1970-01-01")]["new_users"] == 1
        assert report[("month", "1970-01")]["revenue"] == "23.49"


def _record(start: int, end: int, config: str) -> Record:
    return Record(start, end, None, None, [], {}, 0, 0, config)


def test_replay_refuses_a_state_log_written_under_other_settings():
    old = EngineConfig.from_settings(from_mapping({"lateness": "5m"}, "<t>", env={}))
    new = EngineConfig.from_settings(from_mapping({"lateness": "10m"}, "<t>", env={}))
    assert old.fingerprint != new.fingerprint
    rp = Replayer(PartitionEngine(new), partition=3)
    with pytest.raises(StateLogError, match="state log partition 3 was written under different settings"):
        rp.feed(_record(0, 5, old.fingerprint))
    same = Replayer(PartitionEngine(old))
    assert same.feed(_record(0, 5, old.fingerprint))
    assert not same.feed(_record(0, 5, old.fingerprint))  # a repeated record is skipped
    assert same.offset == 5
