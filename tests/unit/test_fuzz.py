"""Fuzz: nothing a producer can send escapes the decoder or breaks the batch path.

Hostile values (deep nesting, huge and tiny exponents, NaN and Infinity, invalid
UTF-8, control characters in ids, wrong JSON types, sizes around the 64 KiB
limit, random bytes, random objects mixing valid and invalid fields) go through

* ``Decoder.decode``: each is an :class:`Event` or a :class:`Rejected` with a
  bounded reason and a detail, never another exception;
* the worker's batch path ``agents.ingest.process_messages`` with a real
  :class:`PartitionEngine`: accepted + duplicate + late + rejected adds up to
  the inputs, and every state-log record encodes (msgpack), decodes back equal
  and replays into an engine in the same state.

About 11,500 generated values in all (hypothesis stops early on the small
spaces), derandomized so CI sees the same ones.
"""

from __future__ import annotations

import json
from typing import Any

from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kpimon.agents.core.batch import Record, process_messages
from kpimon.agents.core.batch import decode as decode_record
from kpimon.agents.core.batch import encode as encode_record
from kpimon.agents.core.engine import EngineConfig, PartitionEngine
from kpimon.agents.worker.recovery import Replayer
from kpimon.streams import topics as wire
from kpimon.streams.events import (
    EARLIEST_TS,
    MAX_AMOUNT_MINOR,
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    Decoder,
    Event,
    Reason,
    Rejected,
)
from tests.factories import DAY, settings_factory

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.filter_too_much])

SETTINGS = settings_factory()
CFG = EngineConfig.from_settings(SETTINGS)
DECODER = Decoder(SETTINGS.money.decimals)
TOPIC = "kpimon.events"
IDS = ("event_id", "user_id", "type", "channel", "referrer_id")
TS0 = 1_710_288_000_000  # 2024-03-13T00:00:00Z

# The valid event every hostile value is a variation of (raw JSON per field).
VALID: dict[str, bytes] = {"event_id": b'"e1"', "user_id": b'"u1"', "type": b'"purchase"',
                           "ts": b'"2024-03-13T10:21:14Z"', "amount": b'"19.99"'}


def obj(fields: dict[str, bytes]) -> bytes:
    return b"{" + b",".join(json.dumps(k).encode() + b":" + v for k, v in fields.items()) + b"}"


def with_field(name: str, raw: bytes) -> bytes:
    return obj({**VALID, name: raw})


# --------------------------------------------------------------------------- strategies

@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b"[1,", b"]"), (b'[{"k":', b"}]")]))
    limit = (MAX_EVENT_BYTES - 200) // (len(opener) + len(closer))
    depth = draw(st.sampled_from([MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 990, 1000, 10_000])
                 | st.integers(1, 30_000))
    depth = min(depth, limit)
    closers = depth if draw(st.booleans()) else draw(st.integers(0, depth))  # unbalanced sometimes
    nested = opener * depth + b"0" + closer * closers
    where = draw(st.sampled_from(["extra", "amount", "ts", "user_id", "whole"]))
    if where == "whole":
        return nested
    if where == "extra":
        return obj({**VALID, "x": nested})
    return with_field(where, nested)


_MANTISSAS = ["0", "1", "-1", "-0", "19.99", "0.001", "5.000", "0.10", "9999999999999.99", "10000000000000",
              "123456789012345678901234567890", "0.0100000000000000000000000000001"]
_EXPONENTS = (st.sampled_from([18, 400, -400, 999_999_999, -999_999_999, 10**20, -(10**20)])
              | st.integers(-10**12, 10**12))
_AMOUNT_WORDS = ["NaN", "-NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf", "+5", " 5", "5 ", "  5 ", "1_000",
                 "\u0661\u0662", ".5", "5.", "007", "0x10", "", "1e", "--1", "1e+", "5\n", "\t5", "5,00"]


@st.composite
def amounts(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["exp", "int", "float", "decimal", "word", "token"]))
    if kind == "exp":
        exponent = draw(_EXPONENTS)
        mark = draw(st.sampled_from(["e", "E", "e+"] if exponent >= 0 else ["e", "E"]))
        text = draw(st.sampled_from(_MANTISSAS)) + mark + str(exponent)
    elif kind == "int":
        text = str(draw(st.integers(-(2**80), 2**80) | st.integers(-5, 10**16)))
    elif kind == "float":
        text = repr(draw(st.floats(allow_nan=False, allow_infinity=False)))
    elif kind == "decimal":
        text = str(draw(st.decimals(allow_nan=True, allow_infinity=True)))
    elif kind == "word":
        text = draw(st.sampled_from(_AMOUNT_WORDS))
    else:  # bare tokens: not JSON
        return with_field("amount", draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"+5", b".5", b"1e",
                                                          b"007", b"0x10", b"1e999999999999999999999"])))
    quoted = draw(st.booleans())
    return with_field("amount", json.dumps(text).encode() if quoted else text.encode())


_BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc3", b"\xc3\x28", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80",
             b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80"]


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    field = draw(st.sampled_from([*VALID, "x"]))
    base = obj({**VALID, "x": b'"extra \\n text"'}) if field == "x" else obj(VALID)
    # inside the field's string value, or anywhere
    if draw(st.booleans()):
        start = base.index(json.dumps(field).encode() + b":") + len(field) + 4
    else:
        start = draw(st.integers(0, len(base)))
    bad = draw(st.sampled_from(_BAD_UTF8))
    return base[:start] + bad + base[start:]


_CONTROLS = st.sampled_from(["\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\x9f", "\x01"]) \
    | st.characters(max_codepoint=0x9F, categories=["Cc"])


@st.composite
def control_chars(draw: st.DrawFn) -> bytes:
    field = draw(st.sampled_from(IDS))
    text = draw(st.text(max_size=4)) + draw(_CONTROLS) + draw(st.text(max_size=4))
    fields = {**VALID, "channel": b'"organic"', "referrer_id": b'"u0"'}
    fields[field] = json.dumps(text, ensure_ascii=draw(st.booleans())).encode()
    return obj(fields)


_JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                 | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
# One level of containers is enough to confuse types; deep_nesting covers depth (st.recursive is slow).
_JSON = (_JSON_SCALARS | st.lists(_JSON_SCALARS, max_size=3)
         | st.dictionaries(st.text(max_size=6), _JSON_SCALARS | st.lists(_JSON_SCALARS, max_size=2), max_size=3))


def dumps(value: Any, ascii_only: bool = True) -> bytes:
    # allow_nan: NaN / Infinity as bare tokens, which JSON does not have
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    field = draw(st.sampled_from([*VALID, "channel", "referrer_id"]))
    return with_field(field, dumps(draw(_JSON)))


@st.composite
def near_the_limit(draw: st.DrawFn) -> bytes:
    delta = draw(st.integers(-3, 3))
    filler = draw(st.sampled_from(["string", "numbers", "flat_arrays", "objects"]))
    head = obj(VALID)[:-1] + b',"pad":'
    room = MAX_EVENT_BYTES + delta - len(head) - 1
    if filler == "string":
        pad = b'"' + b"x" * (room - 2) + b'"'
    elif filler == "numbers":
        n = (room - 2) // 2
        pad = b"[" + b",".join([b"1"] * n) + b"]"
    elif filler == "flat_arrays":  # many brackets, nesting 2
        n = (room - 2) // 3
        pad = b"[" + b",".join([b"[]"] * n) + b"]"
    else:
        n = (room - 2) // 3
        pad = b"[" + b",".join([b"{}"] * n) + b"]"
    pad += b" " * (room - len(pad))  # JSON allows trailing whitespace
    return head + pad + b"}"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(obj({**VALID, "channel": b'"organic"'}))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif len(data) > 1:
            del data[i]
    return bytes(data)


_VALID_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.text(min_size=1, max_size=12),
    "user_id": st.sampled_from(["u1", "u2", "u3", "ü4"]),
    "type": st.sampled_from(["login", "signup", "purchase", "refund", "invite", "page_view", "Signup"]),
    "ts": st.integers(TS0, TS0 + 3 * DAY) | st.sampled_from(["2024-03-13T10:21:14Z", "2024-03-14T01:00:00+02:00"]),
    "amount": st.sampled_from(["0", "19.99", "5.000", "-0", "1e3", 0, 7, 19.99]),
    "channel": st.sampled_from([None, "organic", "paid_search", "tiktok"]),
    "referrer_id": st.sampled_from([None, "u1", "u9"]),
}
_FIELD_VALUES = {k: v | _JSON for k, v in _VALID_VALUES.items()}  # valid or anything


@st.composite
def random_objects(draw: st.DrawFn) -> bytes:
    fields = {k: draw(values) for k, values in _FIELD_VALUES.items() if draw(st.integers(0, 5))}
    for _ in range(draw(st.integers(0, 2))):
        fields[draw(st.text(max_size=6))] = draw(_JSON)
    return dumps(fields, ascii_only=draw(st.booleans()))


HOSTILE = {
    "deep_nesting": deep_nesting(),
    "amounts": amounts(),
    "invalid_utf8": invalid_utf8(),
    "control_chars": control_chars(),
    "wrong_types": wrong_types(),
    "near_the_limit": near_the_limit(),
    "random_bytes": st.binary(max_size=300),
    "mutated": mutated(),
    "random_objects": random_objects(),
}
ANY_HOSTILE = st.one_of(*HOSTILE.values())

# The four poison pills of issue 7, and relatives: always tried first.
PILLS = [
    obj({**VALID, "x": b"[" * 10_000 + b"]" * 10_000}),  # RecursionError in msgspec
    with_field("amount", b'"1e999999999"'),  # decimal.Overflow
    obj({**VALID, "x": b'"\xff"'}),  # invalid UTF-8 in a JSON string
    with_field("amount", b'"1e18"'),  # accepted, then msgpack OverflowError in the state log
    with_field("amount", b"1e400"),
    with_field("amount", b'"1e-999999999"'),
    with_field("user_id", b'"u\\u0000"'),
]


# --------------------------------------------------------------------------- checks

def check(data: bytes) -> Event | Rejected:
    """Decode one value: an Event within the contract, or a bounded rejection."""
    try:
        ev = DECODER.decode(data)
    except Rejected as rej:
        assert isinstance(rej.reason, Reason), rej.reason
        assert isinstance(rej.detail, str) and rej.detail.strip(), rej
        rej.detail.encode()  # goes into a DLQ header: must be valid UTF-8
        return rej
    assert type(ev) is Event
    data.decode("utf-8")  # JSON is UTF-8: an accepted event is, extra fields included
    assert 0 <= ev.amount <= MAX_AMOUNT_MINOR
    assert EARLIEST_TS <= ev.ts <= DECODER.max_ts
    for name in IDS:
        value = getattr(ev, name)
        assert value is None or not any(0x00 <= ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F for c in value), name
    return ev


def strategy_test(name: str, n: int):
    @settings(FUZZ, max_examples=n)
    @given(data=HOSTILE[name])
    def test(data: bytes) -> None:
        ev = check(data)
        if isinstance(ev, Event):  # one-event state-log record
            rec = Record(0, 1, None, None, [ev], {}, 0, 0)
            assert decode_record(encode_record(rec)) == rec

    test.__name__ = f"test_decoder_survives_{name}"
    return test


test_decoder_survives_deep_nesting = strategy_test("deep_nesting", 300)
test_decoder_survives_amounts = strategy_test("amounts", 2000)
test_decoder_survives_invalid_utf8 = strategy_test("invalid_utf8", 800)
test_decoder_survives_control_chars = strategy_test("control_chars", 1200)
test_decoder_survives_wrong_types = strategy_test("wrong_types", 1200)
test_decoder_survives_near_the_limit = strategy_test("near_the_limit", 100)
test_decoder_survives_random_bytes = strategy_test("random_bytes", 1500)
test_decoder_survives_mutated = strategy_test("mutated", 1200)
test_decoder_survives_random_objects = strategy_test("random_objects", 1500)


def test_the_poison_pills_are_rejected_not_raised():
    for pill in PILLS:
        assert isinstance(check(pill), Rejected), pill[:80]


def _record(offset: int, value: bytes | None, headers: list[tuple[str, bytes]]) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, b"u1", value, None, 2, len(value or b""), headers)


_HEADERS = st.sampled_from([[], [], [], [("trace", b"\xff")], [(wire.WATERMARK_HEADER, b"soon")],
                            [(wire.WATERMARK_HEADER, b"\xff\xfe")], [(wire.WATERMARK_HEADER, b"")]])
_VALUES = ANY_HOSTILE | random_objects() | st.sampled_from(PILLS) | st.none()


@settings(FUZZ, max_examples=300)
@given(batch=st.lists(st.tuples(_VALUES, _HEADERS), min_size=1, max_size=25), size=st.integers(1, 25))
@example(batch=[(p, []) for p in PILLS] + [(obj(VALID), [])] * 2, size=25)
def test_batch_path_counts_everything_and_the_state_log_round_trips(batch, size):
    engine = PartitionEngine(CFG)
    msgs = [_record(i, value, headers) for i, (value, headers) in enumerate(batch)]
    # a watermark marker last, a few days on: applies what was accepted, closes days
    msgs.append(_record(len(msgs), None, [(wire.WATERMARK_HEADER, str(TS0 + 4 * DAY).encode())]))
    records, rejected = [], 0
    pos, start = 0, 0
    while pos < len(msgs):
        out, end = process_messages(engine, DECODER, msgs[:pos + size] if pos + size < len(msgs) else msgs, pos,
                                    start, None, SETTINGS.channel_label)
        assert end > pos
        pos, start = end, out.record.end
        records.append(out.record)
        for _, rej in out.dlq:
            assert isinstance(rej.reason, Reason) and rej.detail
        rejected += len(out.dlq)
        assert sum(out.record.rejected.values()) == len(out.dlq)
        for ev in out.record.events:
            assert 0 <= ev.amount <= MAX_AMOUNT_MINOR
        for closed in engine.take_outbox():  # period partials go out as JSON
            wire.json_encode(closed.metrics.to_wire())
    accepted = sum(len(r.events) for r in records)
    duplicates = sum(r.duplicates for r in records)
    late = sum(r.late for r in records)
    assert accepted + duplicates + late + rejected == len(batch)
    assert engine.totals.accepted == accepted
    # The state log: every record encodes, decodes back equal, and replays to the same engine.
    replay = Replayer(PartitionEngine(CFG))
    for rec in records:
        again = decode_record(encode_record(rec))
        assert again == rec
        assert replay.feed(again)
    assert replay.engine.wm == engine.wm
    assert replay.engine.totals.accepted == engine.totals.accepted
    assert replay.engine.totals.rejected == engine.totals.rejected
