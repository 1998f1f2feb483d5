"""The period-close ledger: immutable, versioned, content-hashed snapshots.  Pure.

A snapshot is the record a bonus is paid from.  Version 1 is written when a
period closes.  A late event for a closed period never changes it: it becomes
a *restatement*, version n+1, carrying the new numbers, the delta against
version n and how many late events are behind it.  Every version stays
readable.

Snapshots are canonical JSON (sorted keys, no whitespace, exact decimal
strings), so the same input under the same configuration gives byte-identical
snapshots, and ``hash`` (sha256 of the canonical form without the hash) proves
it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from kpimon.agents.core.effects import add_flows
from kpimon.agents.core.metrics import PeriodMetrics
from kpimon.streams.events import Event, format_money

_encode = msgspec.json.Encoder(order="sorted").encode

# Metrics a late event can restate exactly: they are sums over events.  Distinct-user
# and lifecycle numbers depend on the user's state at that time and are not restated
# (docs/kpis.md, "Restatements").
RESTATABLE = ("orders", "revenue", "refunds", "invites")


def canonical(snapshot: dict[str, Any]) -> bytes:
    return _encode(snapshot)


def content_hash(snapshot: dict[str, Any]) -> str:
    body = {k: v for k, v in snapshot.items() if k != "hash"}
    return "sha256:" + hashlib.sha256(canonical(body)).hexdigest()


def build(grain: str, period: str, start: str, end: str, metrics: dict[str, Any], *, version: int = 1,
          config_version: dict[str, str], kpis: list[dict] | None = None, owners: list[dict] | None = None,
          delta: dict[str, Any] | None = None, late_events: int = 0) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "grain": grain,
        "period": period,
        "start": start,
        "end": end,
        "version": version,
        "config_version": config_version,
        "metrics": metrics,
        "kpis": kpis or [],
        "owners": owners or [],
        "late_events": late_events,
    }
    if delta is not None:
        snap["delta"] = delta
    snap["hash"] = content_hash(snap)
    return snap


def late_delta(events: list[Event], decimals: int) -> tuple[PeriodMetrics, int]:
    """The restatable effect of late events (all in one period) and how many count."""
    d = PeriodMetrics()
    n = 0
    for ev in events:
        n += add_flows(d, ev.code, ev.amount)  # flows commute: agents/core/effects.py
    return d, n


def restate(base: PeriodMetrics, late: PeriodMetrics) -> PeriodMetrics:
    """``base`` with the late events' restatable effect added."""
    out = base.merge(PeriodMetrics())
    for name in RESTATABLE:
        setattr(out, name, getattr(base, name) + getattr(late, name))
    return out


def metrics_delta(old: PeriodMetrics, new: PeriodMetrics, decimals: int) -> dict[str, Any]:
    """Non-zero differences, money as exact signed decimal strings."""
    out: dict[str, Any] = {}
    for name in RESTATABLE:
        diff = getattr(new, name) - getattr(old, name)
        if diff:
            out[name] = (("+" if diff > 0 else "") + format_money(diff, decimals)) if name in ("revenue", "refunds") \
                else diff
    return out


class Staged:
    """What one call produced: snapshots to publish, then changes to commit."""

    __slots__ = ("snapshots", "changes")

    def __init__(self) -> None:
        self.snapshots: list[dict[str, Any]] = []
        self.changes: list[tuple[Any, str, Any]] = []  # (mapping, key, value or None to delete)


class Book:
    """Versions of every closed period, and late events waiting for their period to close.

    State lives in mappings (faust Tables in the worker, dicts in tests):
    ``versions``: "grain/label" -> {"version", "start", "end", "metrics": wire, "late": [event_id, ...]};
    ``pending``: "grain/label" -> {"events": [encoded Event, ...]} for periods not closed yet.
    ``evaluate(grain, label, start_ms, end_ms, metrics_result, prev_result)`` returns (kpis, owners).

    Each call returns a :class:`Staged` (snapshots + the changes behind them); the
    caller publishes the snapshots and then calls :meth:`commit` with it, so a crash
    in between repeats a version (same bytes) rather than losing it.  Calls never
    share staged changes, so two agents using one book cannot commit each other's.
    """

    def __init__(self, versions, pending, *, calendar, warning_state: str, decimals: int,
                 config_version: dict[str, str], evaluate=None) -> None:
        self.versions = versions
        self.pending = pending
        self.cal = calendar
        self.warning_state = warning_state
        self.decimals = decimals
        self.config_version = config_version
        self.evaluate = evaluate
        self._ev_encode = msgspec.msgpack.Encoder().encode
        self._ev_decode = msgspec.msgpack.Decoder(Event).decode

    @staticmethod
    def _get(tx: Staged, mapping, key: str):
        for m, k, v in reversed(tx.changes):
            if m is mapping and k == key:
                return v
        return mapping.get(key)

    @staticmethod
    def _set(tx: Staged, mapping, key: str, value) -> None:
        tx.changes.append((mapping, key, value))

    @staticmethod
    def commit(tx: Staged) -> None:
        for mapping, key, value in tx.changes:
            if value is None:
                mapping.pop(key, None)
            else:
                mapping[key] = value
        tx.changes.clear()

    def _money(self, v: int) -> str:
        return format_money(v, self.decimals)

    def _snapshot(self, tx: Staged, grain: str, label: str, start: int, end: int, metrics: PeriodMetrics,
                  version: int, delta: dict | None, late_events: int) -> dict[str, Any]:
        result = metrics.result(self.warning_state, self._money)
        kpis: list[dict] = []
        owners: list[dict] = []
        if self.evaluate is not None:
            kpis, owners = self.evaluate(grain, label, start, end, result, self.previous(grain, start, tx))
        return build(grain, label, self.cal.iso(start), self.cal.iso(end), result, version=version,
                     config_version=self.config_version, kpis=kpis, owners=owners, delta=delta,
                     late_events=late_events)

    def previous(self, grain: str, start: int, tx: Staged | None = None) -> dict[str, Any] | None:
        """The result of the closed period of ``grain`` ending where this one starts (for prev.* formulas)."""
        prev = self.cal.period_at(start - 1, grain)
        entry = self._get(tx or Staged(), self.versions, f"{grain}/{prev.label}")
        if entry is None:
            return None
        return PeriodMetrics.from_wire(entry["metrics"]).result(self.warning_state, self._money)

    def on_closed(self, grain: str, label: str, start: int, end: int, metrics: PeriodMetrics) -> Staged:
        """Version 1 of a newly closed period (plus a restatement for late events already waiting)."""
        tx = Staged()
        key = f"{grain}/{label}"
        if self._get(tx, self.versions, key) is None:
            self._set(tx, self.versions, key, {"version": 1, "start": start, "end": end,
                                               "metrics": metrics.to_wire(), "late": []})
            tx.snapshots.append(self._snapshot(tx, grain, label, start, end, metrics, 1, None, 0))
        # A repeated close finds version 1; late events still waiting (a crash after version 1 was written,
        # before they were restated) are restated now.  Restating skips events already in a version, and the
        # waiting events are dropped only after the restatement is written: a crash in between (the changes
        # reach the changelog in this order) leaves them waiting, never lost.
        waiting = self._get(tx, self.pending, key)
        if waiting:
            self._restate(tx, key, [self._ev_decode(b) for b in waiting["events"]])
            self._set(tx, self.pending, key, None)
        return tx

    def on_late(self, events: list[Event]) -> Staged:
        """Late events: restate closed periods they fall in, or hold them until their period closes."""
        tx = Staged()
        by_key: dict[str, list[Event]] = {}
        for ev in events:
            for period in self.cal.periods_at(ev.ts):
                by_key.setdefault(f"{period.grain}/{period.label}", []).append(ev)
        for key, evs in by_key.items():
            if self._get(tx, self.versions, key) is not None:
                self._restate(tx, key, evs)
            else:
                entry = self._get(tx, self.pending, key) or {"events": []}
                known = {self._ev_decode(b).event_id for b in entry["events"]}
                fresh = [self._ev_encode(e) for e in evs if e.event_id not in known]
                if fresh:
                    self._set(tx, self.pending, key, {"events": [*entry["events"], *fresh]})
        return tx

    def _restate(self, tx: Staged, key: str, events: list[Event]) -> None:
        entry = self._get(tx, self.versions, key)
        seen = set(entry["late"])
        fresh = []
        for ev in events:
            if ev.event_id not in seen:
                seen.add(ev.event_id)
                fresh.append(ev)
        late, n = late_delta(fresh, self.decimals)
        if not n:
            return
        base = PeriodMetrics.from_wire(entry["metrics"])
        new = restate(base, late)
        version = entry["version"] + 1
        grain, label = key.split("/", 1)
        self._set(tx, self.versions, key, {"version": version, "start": entry["start"], "end": entry["end"],
                                           "metrics": new.to_wire(), "late": sorted(seen)})
        tx.snapshots.append(self._snapshot(tx, grain, label, entry["start"], entry["end"], new, version,
                                           metrics_delta(base, new, self.decimals), n))
