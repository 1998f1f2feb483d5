"""The one way kpimon connects to Redis (serving writer, snapshot store, HTTP API, CLI).

Every client fails fast: a connect gives up after :data:`CONNECT_TIMEOUT_S`, a
reply after :data:`TIMEOUT_S`, and redis-py does not retry on its own (the
callers that must keep going, the serving writer and the snapshot store, retry
with their own back-off; the CLI reports at once).  A caller that cannot go on
without Redis raises :func:`unavailable`, a :class:`~kpimon.errors.RedisUnavailable`
that the command prints as one line (exit status 1).
"""

from __future__ import annotations

import asyncio as _asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kpimon.errors import RedisUnavailable

TIMEOUT_S = 5.0  # the longest wait for one reply
CONNECT_TIMEOUT_S = 2.0  # the longest wait for a connection (never more than the reply timeout)


def client(url: str, *, asyncio: bool, timeout: float = TIMEOUT_S) -> Any:
    """A ``redis.asyncio.Redis`` (``asyncio=True``) or ``redis.Redis`` for ``url``, without client-side retries."""
    from redis.backoff import NoBackoff

    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": min(CONNECT_TIMEOUT_S, timeout),
                              "health_check_interval": 0}
    if asyncio:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry as AsyncRetry

        return aioredis.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **kwargs)
    import redis
    from redis.retry import Retry

    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **kwargs)


def errors() -> tuple[type[BaseException], ...]:
    """What a Redis round trip raises when Redis is down, slow or refuses."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, _asyncio.TimeoutError)


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def unavailable(url: str, exc: BaseException) -> RedisUnavailable:
    """The one message for an unreachable Redis."""
    detail = str(exc) or type(exc).__name__
    return RedisUnavailable(f"cannot reach Redis at {redact(url)} (redis.url): {detail}")
