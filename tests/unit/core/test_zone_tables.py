"""The zone dicts' tables stay at the size a rebuild gives them (``fresh_slots``, ``_compact``).

Every applied user is moved to the end of zone 0, and each move takes an entry of the dict's table until it
is rebuilt.  If the engine let CPython grow the table when the entries ran out, a live worker's zone 0 would
swing between one table and one twice its size (docs/performance.md).
"""

from __future__ import annotations

import sys

import pytest

from kpimon.agents.core.engine import EngineConfig, PartitionEngine, fresh_slots
from kpimon.streams.events import Decoder
from tests.factories import settings_factory

T0 = 1_704_067_200_000


@pytest.mark.parametrize("n", [5, 100, 1000, 2730, 5000, 40_000])
def test_fresh_slots_is_what_cpython_gives_a_copied_dict(n: int) -> None:
    # (Sizes whose rebuilt table is already >= 3n slots are left out: CPython's own resize keeps those.)
    zone = dict({f"user-{i}": i for i in range(n)})
    size = sys.getsizeof(zone)
    keys = list(zone)
    moves = 0
    while sys.getsizeof(zone) == size and moves <= 4 * n:
        uid = keys[moves % n]
        zone[uid] = zone.pop(uid)  # what _process_until does to each applied user
        moves += 1
    assert moves == fresh_slots(n) - n + 1  # the move after the last free entry grows the table


def _live(users: int, seconds: int, per_second: int) -> list[tuple[int, int]]:
    """A live worker's pattern: every second, ``per_second`` of ``users`` are active (round robin).  Returns
    each second's (zone-0 table size, size of a rebuilt copy of it)."""
    s = settings_factory(lateness="0s")
    engine = PartitionEngine(EngineConfig.from_settings(s))
    dec = Decoder(s.money.decimals)
    sizes = []
    i = 0
    for sec in range(seconds):
        batch = []
        for _ in range(per_second):
            batch.append(dec.decode(b'{"event_id":"e%d","user_id":"u%d","type":"login","ts":%d}'
                                    % (i, i % users, T0 + sec * 1000 + 1)))
            i += 1
        engine.offer_batch(batch)
        engine.advance(marker=T0 + (sec + 1) * 1000)
        z0 = engine.zones[0]
        sizes.append((sys.getsizeof(z0), sys.getsizeof(dict(z0))))
    assert len(engine.zones[0]) == users
    return sizes


def test_zone_zero_never_grows_past_a_rebuilt_table_in_live_running() -> None:
    # 3,000 users: a rebuilt table (8,192 slots) holds 5,461 entries, room for 2,461 moves, more than an eighth.
    sizes = _live(users=3000, seconds=120, per_second=500)
    settled = sizes[20:]  # once every user is known and the table was rebuilt once
    assert all(size == rebuilt for size, rebuilt in settled), max(settled)


def test_near_a_power_of_two_cpython_grows_the_table_and_the_engine_still_bounds_it() -> None:
    # 2,700 users: a rebuilt table holds 2,730 entries, room for 30 moves, less than an eighth: rebuilding
    # that often would cost more than the memory it saves, so the table is let grow to twice the size.
    sizes = _live(users=2700, seconds=120, per_second=500)
    settled = sizes[20:]
    assert max(size for size, _ in settled) <= 2 * max(rebuilt for _, rebuilt in settled) + 1024
