"""What the Apache Kafka and Tansu launchers share: readiness and topic admin.

The admin calls use aiokafka, run on a private event loop in a worker thread,
so they work from plain code and from inside a running event loop alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kpimon.agents.runtime.ports import LOOPBACK, port_open
from kpimon.agents.runtime.process import ManagedProcess

T = TypeVar("T")


def run_sync(factory: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
    """Run ``await factory()`` to completion on a fresh loop in a worker thread."""

    async def runner() -> T:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, runner()).result(timeout)


async def _with_admin(bootstrap: str, request_timeout_ms: int, fn: Callable[[Any], Awaitable[T]]) -> T:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        return await fn(admin)
    finally:
        await admin.close()


def cluster_ready(bootstrap: str, timeout_ms: int = 3000) -> bool:
    """True when a metadata request succeeds and lists at least one broker."""

    async def check(admin: Any) -> bool:
        info = await admin.describe_cluster()
        return bool(info.get("brokers"))

    return run_sync(lambda: _with_admin(bootstrap, timeout_ms, check))


class KafkaBrokerProcess(ManagedProcess):
    """A Kafka-protocol broker on ``127.0.0.1:<port>``."""

    host = LOOPBACK

    def __init__(self, *, port: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fixed_port = port
        self.port: int | None = port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` for clients' ``bootstrap_servers``."""
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return f"{self.host}:{self.port}"

    def _probe(self) -> bool:
        assert self.port is not None
        return port_open(self.host, self.port) and cluster_ready(self.bootstrap)

    # ------------------------------------------------------------------ admin
    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        config: dict[str, str] | None = None,
        exist_ok: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Create a topic and wait until every partition has a leader."""
        from aiokafka.admin import NewTopic
        from aiokafka.errors import for_code

        async def create(admin: Any) -> None:
            topic = NewTopic(name, partitions, replication_factor, topic_configs=config or {})
            resp = await admin.create_topics([topic], timeout_ms=int(timeout * 1000))
            for entry in resp.topic_errors:
                code = entry[1]
                if code == 0 or (exist_ok and code == 36):  # 36 TOPIC_ALREADY_EXISTS
                    continue
                message = entry[2] if len(entry) > 2 else None
                raise for_code(code)(f"create_topic({name!r}): {message}")
            deadline = time.monotonic() + timeout
            while True:
                (desc,) = await admin.describe_topics([name])
                parts = desc.get("partitions") or []
                if desc.get("error_code", 0) == 0 and len(parts) >= partitions and all(
                    p.get("leader", -1) >= 0 for p in parts
                ):
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"topic {name!r} has no leaders after {timeout}s: {desc}")
                await asyncio.sleep(0.05)

        run_sync(lambda: _with_admin(self.bootstrap, int(timeout * 1000), create))

    def list_topics(self) -> list[str]:
        async def names(admin: Any) -> list[str]:
            return sorted(await admin.list_topics())

        return run_sync(lambda: _with_admin(self.bootstrap, 10_000, names))
