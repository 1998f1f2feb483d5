"""kpimon: an event-driven streaming KPI monitor for user operations.

One import name for the project's top-level folders, installed as subpackages:
``kpimon.streams`` (event contract, topics), ``kpimon.agents`` (the worker and
its parts; ``kpimon.agents.core`` is the pure domain), ``kpimon.config``
(settings and KPI spec) and ``kpimon.dashboards`` (Grafana dashboards).
"""

__version__ = "0.1.0"
