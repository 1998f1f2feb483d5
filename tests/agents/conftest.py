"""The faust app in agent tests: faust's test_context, memory Tables, and no broker.

The agents' input cursors (agents/worker/inorder.py) read what faust
did not deliver from ``cursor.broker`` (offset -> (value, headers)) instead of a broker, and their
topics start at offset 0.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kpimon.agents.worker.app import create_app
from kpimon.config.settings import from_mapping


def delivered(**kwargs: Any) -> asyncio.Future:
    """What faust's ``topic.send`` returns: a future of the delivery, here already done."""
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut


async def until(cond: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


async def _zero() -> int:
    return 0


def _reader(records: dict[int, tuple[bytes, Any]]) -> Any:
    async def read(start: int, stop: int):
        for offset in sorted(records):
            if offset >= start:
                yield (offset, *records[offset])
    return read


def agent_app(prefix: str, web_port: int, kpis: str | None = None, **worker: Any) -> Any:
    """A finalized app with memory Tables and input cursors that need no broker."""
    data: dict[str, Any] = {"kafka": {"topic_prefix": prefix}, "redis": {"enabled": False},
                            "worker": {"web_port": web_port, **worker}}
    if kpis is not None:
        data["kpis"] = kpis
    settings = from_mapping(data, "<test>", env={})
    app = create_app(settings, kpi_spec=settings.load_kpis() if kpis is not None else None)
    app.finalize()
    app.conf.store = "memory://"
    app.flow_control.resume()
    for cursor in app.kpimon_cursors:
        cursor.first = _zero
        cursor.broker = {}
        cursor.read = _reader(cursor.broker)
    return app
