"""Durable snapshot storage in Redis, and reading it back (CLI, HTTP).

Layout (prefix ``kpimon:`` by default):
``<prefix>snapshot:<grain>:<period>`` hash: version -> canonical JSON (every version kept);
``<prefix>snapshots`` sorted set: "<grain>:<period>" scored by the period start (epoch s).
Writes are idempotent (HSET of the same bytes), so a repeated publication is harmless.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

log = logging.getLogger("kpimon.snapshots")


def _key(prefix: str, grain: str, period: str) -> str:
    return f"{prefix}snapshot:{grain}:{period}"


class SnapshotStore:
    """Writes snapshots to Redis; keeps the ones it could not write and retries them."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.prefix = prefix
        self.backlog: list[tuple[dict[str, Any], bytes, float]] = []

    async def put(self, snapshot: dict[str, Any], raw: bytes, start_s: float) -> None:
        self.backlog.append((snapshot, raw, start_s))
        pending, self.backlog = self.backlog, []
        for i, (snap, data, score) in enumerate(pending):
            try:
                pipe = self.redis.pipeline(transaction=True)
                pipe.hset(_key(self.prefix, snap["grain"], snap["period"]), str(snap["version"]), data)
                pipe.zadd(f"{self.prefix}snapshots", {f"{snap['grain']}:{snap['period']}": score})
                await pipe.execute()
            except Exception as err:  # noqa: BLE001 - Redis down: keep and retry on the next put
                log.warning("snapshot store unavailable (%s); %d snapshot(s) kept for retry", err,
                            len(pending) - i)
                self.backlog = pending[i:]
                return


def read_versions(client, prefix: str, grain: str, period: str) -> list[dict[str, Any]]:  # noqa: ANN001
    """Every version of one period's snapshot, oldest first (sync redis client)."""
    raw = client.hgetall(_key(prefix, grain, period))
    return [orjson.loads(raw[k]) for k in sorted(raw, key=lambda v: int(v))]


def list_periods(client, prefix: str, grain: str | None = None) -> list[tuple[str, str, int]]:  # noqa: ANN001
    """(grain, period, latest version) of every stored snapshot, by period start."""
    out = []
    for member in client.zrange(f"{prefix}snapshots", 0, -1):
        g, p = member.decode().split(":", 1)
        if grain is None or g == grain:
            versions = client.hkeys(_key(prefix, g, p))
            out.append((g, p, max(int(v) for v in versions) if versions else 0))
    return out
