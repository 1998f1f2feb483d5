"""Launchers of services that only the tests use (Redis, Prometheus); the shipped ones are in kpimon.agents.runtime."""

from tests.launchers.prometheus_server import PrometheusServer
from tests.launchers.redis_server import RedisServer

__all__ = ["PrometheusServer", "RedisServer"]
