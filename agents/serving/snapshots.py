"""Durable snapshot storage in Redis, and reading it back (CLI, HTTP).

Layout (prefix ``kpimon:`` by default):
``<prefix>snapshot:<grain>:<period>`` hash: version -> canonical JSON (every version kept);
``<prefix>snapshots`` sorted set: "<grain>:<period>" scored by the period start (epoch s).
Writes are idempotent (HSET of the same bytes), so a repeated publication is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from kpimon.agents.serving import redis_client
from kpimon.backoff import Backoff

log = logging.getLogger("kpimon.snapshots")


def _key(prefix: str, grain: str, period: str) -> str:
    return f"{prefix}snapshot:{grain}:{period}"


class SnapshotStore:
    """Writes snapshots to Redis in the background, so the ledger agent never waits on Redis.

    While Redis is unavailable the snapshots wait in memory (a few per closed
    period) and are retried with back-off; the topic ``kpimon.snapshots`` has them
    meanwhile.
    """

    def __init__(self, url: str, prefix: str) -> None:
        self.redis = redis_client.client(url, asyncio=True)
        self.prefix = prefix
        self.backlog: list[tuple[dict[str, Any], bytes, float]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def put(self, snapshot: dict[str, Any], raw: bytes, start_s: float) -> None:
        self.backlog.append((snapshot, raw, start_s))
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._flush_forever())
        assert self._wake is not None
        self._wake.set()

    async def _flush_forever(self) -> None:
        assert self._wake is not None
        delay = Backoff(0.5, cap=30.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.backlog:
                snap, data, score = self.backlog[0]
                try:
                    pipe = self.redis.pipeline(transaction=True)
                    pipe.hset(_key(self.prefix, snap["grain"], snap["period"]), str(snap["version"]), data)
                    pipe.zadd(f"{self.prefix}snapshots", {f"{snap['grain']}:{snap['period']}": score})
                    await pipe.execute()
                except Exception as err:  # noqa: BLE001 - Redis down: keep and retry
                    log.warning("snapshot store unavailable (%s); %d snapshot(s) waiting", err, len(self.backlog))
                    await asyncio.sleep(delay.next())
                    continue
                delay.reset()
                self.backlog.pop(0)


def read_versions(client, prefix: str, grain: str, period: str) -> list[dict[str, Any]]:
    """Every version of one period's snapshot, oldest first (sync redis client)."""
    raw = client.hgetall(_key(prefix, grain, period))
    return [orjson.loads(raw[k]) for k in sorted(raw, key=lambda v: int(v))]


def list_periods(client, prefix: str, grain: str | None = None) -> list[tuple[str, str, int]]:
    """(grain, period, latest version) of every stored snapshot, by period start."""
    out = []
    for member in client.zrange(f"{prefix}snapshots", 0, -1):
        g, p = member.decode().split(":", 1)
        if grain is None or g == grain:
            versions = client.hkeys(_key(prefix, g, p))
            out.append((g, p, max(int(v) for v in versions) if versions else 0))
    return out
