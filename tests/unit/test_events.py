"""The event contract: every rejection reason, exact money, timestamps."""

from __future__ import annotations

import pytest

from agents.core.engine import EngineConfig, PartitionEngine
from agents.statelog import Record, Replayer, StateLogError
from config.settings import from_mapping
from streams.events import MIN_TS, Decoder, Reason, Rejected, format_money, parse_instant

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
         "before 2000-01-01"),
        (obj('"amount": "-1"'), Reason.BAD_AMOUNT, "negative"),
        (obj('"amount": "abc"'), Reason.BAD_AMOUNT, "Invalid decimal"),
        (obj('"amount": "NaN"'), Reason.BAD_AMOUNT, "not a finite number"),
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
     ('"0"', 0, "0.00"), ("12345678901234567.89", 1234567890123456789, "12345678901234567.89")],
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
