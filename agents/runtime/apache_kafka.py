"""Single-node KRaft Apache Kafka (broker + controller in one JVM), no Docker.

The broker's jars come from Maven Central: ``pom.xml`` beside this file pins
``org.apache.kafka:kafka_2.13`` and ``mvn dependency:copy-dependencies``
copies it and its runtime dependencies into
``$KPIMON_CACHE/kafka-<version>/libs`` (default cache ``~/.cache/kpimon``).
That happens once; a marker file records a complete fetch, and a file lock
keeps two processes from fetching at the same time.

Command line::

    python -m agents.runtime.apache_kafka fetch        # only warm the jar cache
    python -m agents.runtime.apache_kafka run [--port N]  # broker in the foreground
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from kpimon.agents.runtime.kafka_common import KafkaBrokerProcess
from kpimon.agents.runtime.ports import free_port
from kpimon.agents.runtime.process import cache_root, require_executable

_MARKER = ".kpimon-fetch-complete"

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = STDOUT
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


def pom_text() -> str:
    return resources.files("kpimon.agents.runtime").joinpath("pom.xml").read_text(encoding="utf-8")


def pinned_version() -> str:
    """The Kafka version pinned in ``pom.xml`` (``<kafka.version>``)."""
    match = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom_text())
    if match is None:
        raise RuntimeError("agents/runtime/pom.xml has no <kafka.version> property")
    return match.group(1)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_jars(version: str | None = None, *, cache_dir: Path | None = None) -> Path:
    """Return the directory holding the broker's jars, fetching them if needed.

    ``version`` defaults to the one pinned in ``pom.xml``; another 4.x version
    is fetched by overriding the ``kafka.version`` property. The cache is keyed
    by version and checked against a hash of ``pom.xml``, so an edited pom is
    fetched again.
    """
    version = version or pinned_version()
    pom = pom_text()
    fingerprint = {"version": version, "pom_sha256": hashlib.sha256(pom.encode()).hexdigest()}
    base = (cache_dir or cache_root()) / f"kafka-{version}"
    libs = base / "libs"
    marker = base / _MARKER

    def complete() -> bool:
        try:
            return json.loads(marker.read_text()) == fingerprint and any(libs.glob("kafka_2.13-*.jar"))
        except (OSError, ValueError):
            return False

    if complete():
        return libs
    with _file_lock(base.parent / f"kafka-{version}.lock"):
        if complete():  # another process fetched while we waited
            return libs
        mvn = require_executable("mvn", "fetching the Apache Kafka jars from Maven Central")
        base.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        staging = base / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        (base / "pom.xml").write_text(pom, encoding="utf-8")
        cmd = [
            mvn, "-q", "-B", "-f", str(base / "pom.xml"),
            f"-Dkafka.version={version}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
        ]
        proc = subprocess.run(cmd, cwd=base, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            out = (proc.stdout + proc.stderr).strip().splitlines()[-40:]
            raise RuntimeError(
                f"fetching Kafka {version} jars failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                + "\n".join(out)
            )
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker.write_text(json.dumps(fingerprint))
        return libs


@functools.cache
def java_major_version(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match is None:
        raise RuntimeError(f"cannot read the Java version from: {out.strip()}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


class ApacheKafka(KafkaBrokerProcess):
    """A real Apache Kafka 4.x broker, KRaft combined mode, on loopback.

    Example::

        with ApacheKafka() as kafka:
            kafka.create_topic("events", partitions=4)
            ...  # clients use kafka.bootstrap

    ``restart()`` keeps ports, cluster id and the log dirs (data survives);
    ``stop_process(signal.SIGKILL)`` followed by ``start()`` simulates a crash.
    """

    name = "kafka"

    def __init__(
        self,
        *,
        version: str | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        heap: str = "512m",
        properties: dict[str, Any] | None = None,
        jvm_args: list[str] | None = None,
        log_level: str = "INFO",
        cache_dir: Path | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 30.0,
    ) -> None:
        super().__init__(port=port, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.version = version or pinned_version()
        self._fixed_controller_port = controller_port
        self.controller_port: int | None = controller_port
        self.heap = heap
        self.extra_properties = dict(properties or {})
        self.jvm_args = list(jvm_args or [])
        self.log_level = log_level
        self.cache_dir = cache_dir
        self.cluster_id: str | None = None
        self.libs_dir: Path | None = None
        #: seconds spent in ``StorageTool format`` during the last start()
        self.format_seconds: float | None = None

    def _can_pick_new_ports(self) -> bool:
        return self._fixed_port is None and self._fixed_controller_port is None

    @property
    def server_properties(self) -> Path:
        return self.workdir / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def broker_properties(self) -> dict[str, Any]:
        """The server.properties this instance runs with."""
        assert self.port is not None and self.controller_port is not None
        props: dict[str, Any] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            # 4.x dynamic quorum; formatted with --standalone
            "controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}",
            "log.dirs": str(self.data_dir),
            "num.partitions": 1,
            "default.replication.factor": 1,
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            # tests and the demo use short consumer session timeouts (2-3 s)
            "group.min.session.timeout.ms": 500,
        }
        props.update(self.extra_properties)
        return props

    def _prepare(self, workdir: Path, attempt: int) -> list[str]:
        java = require_executable("java", "the Apache Kafka broker (Java 17+)")
        major = java_major_version(java)
        if major < 17:
            raise RuntimeError(f"Apache Kafka {self.version} needs Java 17+, found Java {major} at {java}")
        self.libs_dir = fetch_jars(self.version, cache_dir=self.cache_dir)
        self.port = self._fixed_port or free_port()
        self.controller_port = self._fixed_controller_port or free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.cluster_id = new_cluster_id()

        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.server_properties.write_text(
            "".join(f"{k}={v}\n" for k, v in self.broker_properties().items()), encoding="utf-8"
        )
        log4j = workdir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(level=self.log_level), encoding="utf-8")
        quiet = workdir / "log4j2-tool.properties"
        quiet.write_text(_LOG4J2.format(level="WARN"), encoding="utf-8")

        classpath = f"{self.libs_dir}/*"
        started = time.monotonic()
        fmt = subprocess.run(
            [
                java, "-Xmx256m", f"-Dlog4j2.configurationFile={quiet}", "-cp", classpath,
                "kafka.tools.StorageTool", "format", "--standalone",
                "-t", self.cluster_id, "-c", str(self.server_properties),
            ],
            cwd=workdir, capture_output=True, text=True, timeout=120,
        )
        self.format_seconds = time.monotonic() - started
        with open(workdir / f"{self.name}.log", "a", encoding="utf-8") as log:
            log.write(f"--- kpimon: StorageTool format (exit {fmt.returncode})\n{fmt.stdout}{fmt.stderr}")
        if fmt.returncode != 0:
            raise RuntimeError(
                f"kafka StorageTool format failed (exit {fmt.returncode}):\n{(fmt.stdout + fmt.stderr)[-4000:]}"
            )
        return [
            java,
            f"-Xmx{self.heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            *self.jvm_args,
            "-cp", classpath,
            "kafka.Kafka", str(self.server_properties),
        ]


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.runtime.apache_kafka", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="fetch the broker jars into the cache and exit")
    p_fetch.add_argument("--version", default=None)
    p_run = sub.add_parser("run", help="run a broker in the foreground until ^C / SIGTERM")
    p_run.add_argument("--version", default=None)
    p_run.add_argument("--port", type=int, default=None, help="PLAINTEXT port (default: a free one)")
    p_run.add_argument("--controller-port", type=int, default=None)
    p_run.add_argument("--heap", default="512m")
    args = parser.parse_args(argv)

    if args.cmd == "fetch":
        started = time.monotonic()
        libs = fetch_jars(args.version)
        print(f"kafka {args.version or pinned_version()} jars: {libs} ({time.monotonic() - started:.1f}s)")
        return 0

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with ApacheKafka(version=args.version, port=args.port, controller_port=args.controller_port,
                     heap=args.heap) as kafka:
        print(f"bootstrap={kafka.bootstrap}", flush=True)
        print(f"kafka {kafka.version} ready in {kafka.startup_seconds:.1f}s; log: {kafka.log_path}",
              file=sys.stderr, flush=True)
        while not stop.is_set() and kafka.running:
            stop.wait(0.5)
        if not kafka.running:
            print(f"kafka exited unexpectedly; log tail:\n{kafka.log_tail()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
