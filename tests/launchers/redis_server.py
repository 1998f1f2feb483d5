"""A throwaway ``redis-server`` on loopback, without persistence."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from kpimon.agents.runtime.ports import LOOPBACK, free_port
from kpimon.agents.runtime.process import ManagedProcess, require_executable


class RedisServer(ManagedProcess):
    """``redis-server --save "" --appendonly no`` on ``127.0.0.1:<port>``.

    ``restart()`` brings the server back on the same port (data is gone, as
    nothing is persisted), which is what outage tests need; ``stop_process()``
    alone leaves the port closed until ``start()``/``restart()``.
    """

    name = "redis"
    host = LOOPBACK

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: list[str] | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self._fixed_port = port
        self.port: int | None = port
        self.extra_args = list(extra_args or [])

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        if self.port is None:
            raise RuntimeError("redis is not started")
        return f"redis://{self.host}:{self.port}/0"

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.Redis`` connected to this server (caller closes it)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def _prepare(self, workdir: Path, attempt: int) -> list[str]:
        binary = require_executable("redis-server", "the Redis server used by tests and the demo")
        self.port = self._fixed_port or free_port()
        return [
            binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
            *self.extra_args,
        ]

    def _probe(self) -> bool:
        # raw RESP PING: no client-side retries/backoff while the port is still closed
        assert self.port is not None
        with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
