"""The event contract: schema, fast decoding, validation and rejection reasons.

An event is a JSON object on ``kpimon.events``, keyed by ``user_id``.  Decoding
uses one reusable msgspec decoder (~0.3 µs/event); every failure is mapped to
one of a small, fixed set of *reasons* (bounded Prometheus label values) plus a
human-readable detail that goes to the dead-letter topic.  Nothing a producer
can send makes :meth:`Decoder.decode` raise anything but :class:`Rejected`.

This module is pure: no faust, no Kafka, no Prometheus.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import re
from enum import StrEnum
from itertools import accumulate
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from kpimon.errors import KpimonError

MAX_EVENT_BYTES = 64 * 1024
# Deepest JSON nesting accepted anywhere in an event (extra fields included).  msgspec
# recurses on nesting; a fixed limit keeps the decision independent of the caller's stack.
MAX_DEPTH = 128
# Largest amount in minor units: 15 digits.  Every such integer is exact as an IEEE double
# (Prometheus, JavaScript, Lua in Redis), and sums of up to 9,223 maximal amounts still
# fit the signed 64-bit integers of the state log and the serving layer (msgpack).
MAX_AMOUNT_MINOR = 10**15 - 1

# Event type codes used by the engine (ints are cheaper than strings).
ACTIVITY = 0
SIGNUP = 1
PURCHASE = 2
REFUND = 3
INVITE = 4
TYPE_CODES = {"signup": SIGNUP, "purchase": PURCHASE, "refund": REFUND, "invite": INVITE}


class Reason(StrEnum):
    """Why an event was rejected.  These are the only values of the ``reason`` label."""

    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    BAD_TIMESTAMP = "bad_timestamp"
    BAD_AMOUNT = "bad_amount"
    TOO_LARGE = "too_large"


class Rejected(KpimonError):
    """An event that cannot be accepted; carries a bounded reason and a detail."""

    __slots__ = ("reason", "detail")

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


Id = Annotated[str, Meta(min_length=1, max_length=128)]
Timestamp = Annotated[_dt.datetime, Meta(tz=True)] | int


class RawEvent(msgspec.Struct, gc=False):
    """The wire schema.  Unknown extra fields are ignored.

    ``amount`` is decoded untyped (JSON integer -> int, other JSON number ->
    Decimal, string -> str) so that :meth:`Decoder._minor_units` can hold
    strings to the JSON number grammar (``"+5"`` or ``" 5"`` are not numbers).
    """

    event_id: Id
    user_id: Id
    type: Annotated[str, Meta(min_length=1, max_length=64)]
    ts: Timestamp
    amount: Any = None
    channel: Annotated[str, Meta(max_length=128)] | None = None
    referrer_id: Id | None = None


class Event(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """A validated, normalized event as the engine sees it.

    ``amount`` is in minor currency units (an exact int), ``ts`` in epoch ms.
    Encoded ``array_like`` so the state log stays compact.
    """

    ts: int
    event_id: str
    user_id: str
    code: int
    type: str
    amount: int = 0
    channel: str | None = None
    referrer_id: str | None = None


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_MS = _dt.timedelta(milliseconds=1)
# Default floor of *integer* ts (setting ``min_epoch_ms``): before 2000 an integer is almost
# certainly a unit error (epoch seconds read as milliseconds).
MIN_TS = 946684800000  # 2000-01-01T00:00:00Z
# Floor of every ts, RFC 3339 included: the engine packs instants as non-negative ints.
EARLIEST_TS = 0  # 1970-01-01T00:00:00Z
_MAX_TS = 4102444800000  # 2100-01-01

_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
_ID_FIELDS = ("event_id", "user_id", "type", "channel", "referrer_id")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_RUN = b"[" * (MAX_DEPTH + 1)
_DELTA = tuple(1 if c == 0x5B else -1 if c == 0x5D else 0 for c in range(256))  # [ and ]
_TYPE_NAMES = {bool: "bool", list: "array", dict: "object"}
_D = decimal.Decimal
# Traps Inexact: scaling an amount whose digits do not fit the precision (or underflow) raises.
_EXACT = decimal.Context(prec=40, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])


def _show(ts: int | _dt.datetime) -> str:
    """A timestamp as the producer wrote it (RFC 3339 or epoch ms), for rejection details."""
    return ts.isoformat() if isinstance(ts, _dt.datetime) else str(ts)


def _iso(ms: int) -> str:
    """Epoch ms as RFC 3339 in UTC (``2023-11-14T22:13:20Z``)."""
    when = _EPOCH + ms * _MS
    return when.isoformat(timespec="milliseconds" if ms % 1000 else "seconds").replace("+00:00", "Z")


def _clip(text: str, limit: int = 40) -> str:
    """A producer's value, shortened for a rejection detail (details end up in logs and headers)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def _too_deep(data: bytes) -> bool:
    """Whether the JSON ``data`` nests arrays/objects more than :data:`MAX_DEPTH` deep.

    Exact for valid JSON (invalid JSON may be misjudged, but it is not_json anyway):
    strings are blanked, every bracket becomes ``[`` or ``]``, and the depth is the
    highest running count of open brackets.  Runs of ``[`` settle the usual hostile
    input without counting."""
    t = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    if _RUN in t:
        return True
    t = t.replace(b"[]", b"")  # the innermost pairs: one level less everywhere it was deepest
    if not t:
        return False
    if _RUN[1:] in t:
        return True
    return max(accumulate(map(_DELTA.__getitem__, t))) + 1 > MAX_DEPTH


def _classify(err: msgspec.DecodeError) -> Rejected:
    msg = str(err)
    if not isinstance(err, msgspec.ValidationError):
        return Rejected(Reason.NOT_JSON, msg)
    if msg.startswith("Expected `object`") and " - at `" not in msg:
        return Rejected(Reason.NOT_OBJECT, msg)
    if msg.startswith("Object missing required field"):
        return Rejected(Reason.MISSING_FIELD, msg)
    if msg.endswith("at `$.ts`"):
        return Rejected(Reason.BAD_TIMESTAMP, msg)
    if msg.endswith("at `$.amount`"):
        return Rejected(Reason.BAD_AMOUNT, msg)
    return Rejected(Reason.INVALID_FIELD, msg)


class Decoder:
    """Decodes raw bytes into :class:`Event`; raises :class:`Rejected` and nothing else.

    ``decimals`` is the number of minor-unit digits of the currency: amounts
    with more non-zero fractional digits than that are rejected rather than
    rounded.  ``min_epoch_ms`` is the earliest *integer* ts accepted (setting
    ``min_epoch_ms``); RFC 3339 timestamps carry their unit and are accepted
    from :data:`EARLIEST_TS` (1970-01-01T00:00:00Z) on.
    """

    __slots__ = ("_dec", "_unit", "_scale", "_max_digits", "decimals", "max_ts", "min_epoch_ms")

    def __init__(self, decimals: int = 2, max_ts: int = _MAX_TS, min_epoch_ms: int = MIN_TS) -> None:
        self._dec = msgspec.json.Decoder(RawEvent, float_hook=_D)  # exact JSON numbers
        self.decimals = decimals
        self._unit = 10**decimals
        self._scale = _D(self._unit)
        self._max_digits = len(str(MAX_AMOUNT_MINOR)) - decimals  # integer digits of the largest amount
        # Latest acceptable ts; the worker sets it to wall clock + max_future before each
        # batch, so that one event dated 2099 cannot push a partition's watermark there.
        self.max_ts = max_ts
        self.min_epoch_ms = min_epoch_ms

    def decode(self, data: bytes) -> Event:
        try:
            n = len(data)
            if n > MAX_EVENT_BYTES:
                raise Rejected(Reason.TOO_LARGE, f"event is {n} bytes, the limit is {MAX_EVENT_BYTES}")
            plain = data.isascii()
            if not plain:
                # JSON is UTF-8 (RFC 8259); msgspec checks the fields it decodes but skips extra ones.
                try:
                    data.decode()
                except UnicodeDecodeError as err:
                    raise Rejected(Reason.NOT_JSON, f"invalid UTF-8 at byte {err.start}") from None
            # Deeper than MAX_DEPTH takes > 2 bytes a level with arrays ("[" 91), > 5 with objects only.
            if (n > 2 * MAX_DEPTH and (91 in data or n > 5 * MAX_DEPTH)
                    and data.count(b"[") + data.count(b"{") > MAX_DEPTH and _too_deep(data)):
                raise Rejected(Reason.NOT_JSON, f"JSON nested more than {MAX_DEPTH} levels deep")
            try:
                raw = self._dec.decode(data)
            except msgspec.DecodeError as err:
                raise _classify(err) from None
            except RecursionError:  # unbalanced brackets nested thousands deep
                raise Rejected(Reason.NOT_JSON, f"JSON nested more than {MAX_DEPTH} levels deep") from None
            except decimal.InvalidOperation:  # from float_hook: only `amount` is decoded untyped
                raise Rejected(Reason.BAD_AMOUNT, "amount has an exponent beyond any supported range") from None
            if 92 in data or 127 in data or (not plain and 194 in data):
                # Control characters can only come as escapes (\\), DEL or U+0080..U+009F (0xC2 0x80..).
                _check_ids(raw)
            ts = raw.ts
            if isinstance(ts, int):  # msgspec gives an exact int or a datetime (bool is rejected): as `type(ts) is int`
                ts_ms = ts
                if ts_ms < self.min_epoch_ms:
                    raise Rejected(Reason.BAD_TIMESTAMP, self._too_early(ts_ms))
            else:
                ts_ms = (ts - _EPOCH) // _MS
                if ts_ms < EARLIEST_TS:
                    raise Rejected(Reason.BAD_TIMESTAMP, f"ts {_show(ts)} is before {_iso(EARLIEST_TS)}, "
                                                         "the earliest instant kpimon accepts")
            if ts_ms > self.max_ts:
                hint = ""
                if type(ts) is int and self.min_epoch_ms <= ts // 1000 <= self.max_ts:
                    hint = f"; as epoch microseconds it would be {_iso(ts // 1000)}"
                raise Rejected(Reason.BAD_TIMESTAMP,
                               f"ts {_show(ts)} is too far in the future (after {self.max_ts} ms){hint}")
            code = TYPE_CODES.get(raw.type, ACTIVITY)
            amount = 0
            if raw.amount is not None:
                amount = self._minor_units(raw.amount)
            elif code == PURCHASE or code == REFUND:
                raise Rejected(Reason.MISSING_FIELD, f"`amount` is required for {raw.type} events")
            return Event(ts_ms, raw.event_id, raw.user_id, code, raw.type, amount, raw.channel, raw.referrer_id)
        except (RecursionError, ValueError, ArithmeticError) as err:
            # Last line of defence: every known cause is checked before it can raise, so
            # reaching this is a gap in the checks above -- still a rejection, never a crash.
            reason = Reason.BAD_AMOUNT if isinstance(err, ArithmeticError) else Reason.NOT_JSON
            raise Rejected(reason, f"cannot decode the event ({type(err).__name__}: {_clip(str(err), 200)})") from None

    def _too_early(self, ts: int) -> str:
        floor = self.min_epoch_ms
        detail = (f"ts {ts} is before min_epoch_ms {floor} ({_iso(floor)}): an integer ts is epoch milliseconds")
        if floor <= ts * 1000 <= self.max_ts:
            detail += f"; as epoch seconds it would be {_iso(ts * 1000)}"
        return detail

    def _minor_units(self, value: Any) -> int:
        """An amount in exact minor units; JSON numbers and decimal strings follow the same rules."""
        kind = type(value)
        if kind is _D:  # a JSON number with a fraction or an exponent
            return self._exact(value, value)
        if kind is int:  # a JSON integer
            if value < 0:
                raise Rejected(Reason.BAD_AMOUNT, f"amount {value} is negative")
            minor = value * self._unit
            if minor > MAX_AMOUNT_MINOR:
                raise Rejected(Reason.BAD_AMOUNT, self._too_large(_clip(str(value))))
            return minor
        if kind is not str:
            raise Rejected(Reason.BAD_AMOUNT, f"amount must be a number or a decimal string, got "
                                              f"`{_TYPE_NAMES.get(kind, kind.__name__)}`")
        if _JSON_NUMBER.fullmatch(value) is None:
            raise Rejected(Reason.BAD_AMOUNT, f"amount {_clip(value)!r} is not a decimal number written as in JSON "
                                              "(such as 19.99, 1e3 or -0; no spaces, no leading + or zeros)")
        try:
            number = _D(value)
        except decimal.InvalidOperation:  # an exponent beyond decimal's range
            raise Rejected(Reason.BAD_AMOUNT, f"amount {_clip(value)} has an exponent beyond any supported "
                                              "range") from None
        return self._exact(number, value)

    def _exact(self, value: decimal.Decimal, shown: Any) -> int:
        if not value:  # zero: 0, -0, 0.000, 0e999999999
            return 0
        if value.is_signed():
            raise Rejected(Reason.BAD_AMOUNT, f"amount {_clip(str(shown))} is negative")
        if value.adjusted() >= self._max_digits:
            raise Rejected(Reason.BAD_AMOUNT, self._too_large(_clip(str(shown))))
        try:
            # Inexact: non-zero digits lost to the precision or to underflow (1e-999999999).
            scaled = _EXACT.multiply(value, self._scale)
            minor = int(scaled)
            exact = minor == scaled  # trailing zeros are exact: 5.000 is 500 minor units
        except decimal.Inexact:
            exact = False
        if not exact:
            raise Rejected(Reason.BAD_AMOUNT,
                           f"amount {_clip(str(shown))} has more than {self.decimals} decimal places")
        return minor

    def _too_large(self, shown: str) -> str:
        return (f"amount {shown} is too large: at most {format_money(MAX_AMOUNT_MINOR, self.decimals)} "
                f"({MAX_AMOUNT_MINOR} minor units)")


def _check_ids(raw: RawEvent) -> None:
    """Control characters (NUL, newlines, escapes...) in an id would reach Redis keys, logs and CSV."""
    for name in _ID_FIELDS:
        value = getattr(raw, name)
        if value is not None:
            found = _CONTROL.search(value)
            if found is not None:
                raise Rejected(Reason.INVALID_FIELD, f"`{name}` contains the control character "
                                                     f"U+{ord(found.group()):04X} at position {found.start()}")


_ts_decoder = msgspec.json.Decoder(Timestamp)


def parse_instant(text: str) -> int:
    """An instant given on the command line: RFC 3339 with an offset, or epoch ms."""
    body = text.strip()
    raw = body.encode() if body.lstrip("-").isdigit() else msgspec.json.encode(body)
    try:
        value = _ts_decoder.decode(raw)
    except msgspec.DecodeError:
        raise ValueError(f"invalid instant {text!r}: expected RFC 3339 with an offset "
                         "(2024-03-13T10:21:14Z) or epoch milliseconds") from None
    return value if isinstance(value, int) else (value - _EPOCH) // _MS


def format_money(minor: int, decimals: int = 2) -> str:
    """Exact decimal string of an amount in minor units: ``12345 -> '123.45'``."""
    if decimals == 0:
        return str(minor)
    sign = "-" if minor < 0 else ""
    q, r = divmod(abs(minor), 10**decimals)
    return f"{sign}{q}.{r:0{decimals}d}"


def parse_money(text: str, decimals: int = 2) -> int:
    """Inverse of :func:`format_money`."""
    value = decimal.Decimal(text) * (decimal.Decimal(10) ** decimals)
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} has more than {decimals} decimal places")
    return int(value)
