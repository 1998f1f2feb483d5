"""Every record of the agents' one-partition input topics applied once and in order, even when faust drops some.

faust's consumer can drop records it fetched while a rebalance or its table
recovery was under way, and then go on past them: measured, a restarted
worker's ``aggregate`` agent was handed offsets 1-9 of the partials topic,
then 136 on, with or without a committed offset to seek back to; the day
whose partial was among the dropped records was published without it.  So
each agent keeps, in its changelogged state (the same Table, so the same
changelog prefix as the state it produced), the offset of the next record to
apply: a record below it was applied already and is skipped (a redelivery
after a crash or a rebalance), and a record above it means that faust
dropped the ones in between, which are read from the broker directly and
applied first.  The same check covers faust committing an offset before the
state writes of the records below it reached the changelog (its pre-commit
flush gives up after 0.1 s on one buffered message): after a crash the
recovered cursor is below the committed offset, and the records in between
are read from the broker.  Records that the broker no longer holds (deleted by
retention before they were applied) stop the agent: the numbers could not
be exact.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from typing import Any

from kpimon.agents.worker.logread import log_starts, read_to_end
from kpimon.errors import KpimonError

log = logging.getLogger("kpimon.app")

Record = tuple[int, bytes, Any]  # offset, value, headers


class RecordsLost(KpimonError):
    """Records of an agent's input were deleted before the agent applied them."""


class Cursor:
    """The next offset of partition 0 of ``topic`` that the agent applies, kept under ``offset/<name>`` in
    ``state``.  ``first`` (the topic's first offset, used while the state holds none) and ``read`` (the
    records of an offset range) go to the broker unless given."""

    def __init__(self, state: MutableMapping[str, Any], name: str, topic: str, bootstrap: str,
                 first: Callable[[], Awaitable[int]] | None = None,
                 read: Callable[[int, int], AsyncGenerator[Record, None]] | None = None) -> None:
        self.state, self.key, self.topic, self.bootstrap = state, f"offset/{name}", topic, bootstrap
        self.first = first or self._log_start
        self.read = read or self._read
        self.refetched = 0  # records read from the broker because faust dropped them (a metric for tests and logs)

    async def next(self) -> int:
        got = self.state.get(self.key)
        return int(got["next"]) if got is not None else await self.first()

    def set(self, next_offset: int) -> None:
        self.state[self.key] = {"next": next_offset}

    async def through(self, expected: int, record: Record) -> AsyncGenerator[Record, None]:
        """What to apply for ``record`` (delivered by faust) when ``expected`` is the next offset to apply:
        nothing if it was applied already; else the records faust dropped before it (read from the broker),
        then it."""
        offset = record[0]
        if offset < expected:
            return  # applied already (redelivered after a crash or a rebalance)
        if offset > expected:  # faust dropped the records in between
            async for missing in self.between(expected, offset):
                yield missing
        yield record

    async def between(self, start: int, stop: int) -> AsyncGenerator[Record, None]:
        """The records ``start`` to ``stop - 1``, read from the broker; :class:`RecordsLost` if any is gone."""
        log.warning("%s[0]: records %d to %d were not delivered by faust; read from the broker", self.topic, start,
                    stop - 1)
        expect = start
        async with contextlib.aclosing(self.read(start, stop)) as records:
            async for offset, value, headers in records:
                if offset >= stop:
                    break
                if offset != expect:
                    raise RecordsLost(f"{self.topic}[0]: records {expect} to {offset - 1} were deleted before "
                                      "they were applied")
                self.refetched += 1
                yield offset, value, headers
                expect = offset + 1
        if expect != stop:
            raise RecordsLost(f"{self.topic}[0]: records {expect} to {stop - 1} could not be read")

    async def _log_start(self) -> int:
        return (await log_starts(self.bootstrap, self.topic, [0]))[0]

    async def _read(self, start: int, stop: int) -> AsyncGenerator[Record, None]:
        async with contextlib.aclosing(read_to_end(self.bootstrap, self.topic, [0], {0: start})) as records:
            async for _, rec in records:
                yield rec.offset, rec.value, rec.headers
