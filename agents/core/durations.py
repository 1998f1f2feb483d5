"""Durations written as text: ``500ms``, ``30s``, ``5m``, ``2h``, ``7d``, ``1w``, ``1h30m``.  Pure.

This module owns parsing such durations into milliseconds
(:func:`parse_duration`, used for ``lateness``, ``dedup_horizon``, the
lifecycle thresholds and the other durations of the configuration) and
writing milliseconds back in canonical form (:func:`format_duration`).
Standard library only.
"""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_DAY_MS = 86_400_000
_UNITS: tuple[tuple[str, int], ...] = (
    ("w", 7 * _DAY_MS),
    ("d", _DAY_MS),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
)
_UNIT_MS = dict(_UNITS)
_UNIT_RANK = {u: i for i, (u, _) in enumerate(_UNITS)}
_DURATION_RE = re.compile(r"(?:[0-9]+(?:ms|s|m|h|d|w))+")
_PART_RE = re.compile(r"([0-9]+)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> int:
    """Parse ``500ms``, ``30s``, ``5m``, ``2h``, ``7d``, ``1w`` or combinations
    such as ``1h30m`` (largest unit first, each unit at most once) into
    milliseconds.  Surrounding whitespace is ignored."""
    if not isinstance(text, str):
        raise TypeError(f"duration must be a str, got {type(text).__name__}")
    s = text.strip()
    if not _DURATION_RE.fullmatch(s):
        raise ValueError(
            f"invalid duration {text!r}: expected a number followed by ms, s, m, h, d or w"
        )
    total = 0
    last_rank = -1
    for number, unit in _PART_RE.findall(s):
        rank = _UNIT_RANK[unit]
        if rank <= last_rank:
            raise ValueError(
                f"invalid duration {text!r}: units must appear at most once, "
                f"largest first (w, d, h, m, s, ms)"
            )
        last_rank = rank
        total += int(number) * _UNIT_MS[unit]
    return total


def format_duration(ms: int) -> str:
    """Canonical form of a duration: largest units first, each component below
    the next larger unit (``1h30m``, not ``90m``), days as the largest unit
    (``7d``, ``14d``; weeks are accepted by :func:`parse_duration` but never
    produced), ``0s`` for zero."""
    if isinstance(ms, bool) or not isinstance(ms, int):
        raise TypeError(f"duration must be int milliseconds, got {type(ms).__name__}")
    if ms < 0:
        raise ValueError(f"duration must be >= 0 ms, got {ms}")
    if ms == 0:
        return "0s"
    parts: list[str] = []
    rest = ms
    for unit, size in _UNITS[1:]:  # d, h, m, s, ms
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)
