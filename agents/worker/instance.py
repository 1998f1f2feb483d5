"""The worker's static group membership: a stable ``group.instance.id`` per worker slot on a host.

With dynamic membership, a worker killed by SIGKILL (or the OOM killer, or a
node failure) stays in its consumer groups until its session times out, and
its restarted process has to wait that long before it owns any partition:
about ``worker.session_timeout`` (10 s) of every restart.  A *static* member
(KIP-345) that rejoins under the same instance id takes its place at once,
without a rebalance of the other members.

The id must be stable across restarts of one worker and distinct between the
workers running at the same time.  Unless ``worker.instance_id`` names it,
the worker takes the lowest free *slot* on its host: an exclusive lock on
``<state_dir>/<topic_prefix><app_id>/instance-<n>.lock``, held while the
process lives and released by the operating system when it dies however it
dies, so a restarted worker finds its slot free again and the id is
``<hostname>-<n>``.  Two workers on one host get slots 0 and 1.

A static member does not leave its groups on a clean stop either: when a
worker is stopped for good (scaling in), its partitions move to the others
after ``worker.session_timeout``.  ``worker.static_membership: false`` turns
all this off.  Brokers that ignore the id (Tansu) behave as with dynamic
membership.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from kpimon.errors import KpimonError

MAX_SLOTS = 1024


class InstanceTaken(KpimonError):
    """The named instance id is held by another worker process on this host."""


@dataclass
class Instance:
    """A claimed instance id and the lock that holds it (released by :meth:`release` or the process's end)."""

    id: str
    path: str
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200] or "host"


def _lock(path: str) -> int | None:
    """An exclusive lock on ``path`` (created if missing); None if another process (or open file) holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def claim(state_dir: str, name: str, instance_id: str | None = None, host: str | None = None) -> Instance:
    """Claim this worker's instance id under ``state_dir``/``name`` (see the module docstring)."""
    folder = os.path.join(state_dir, name)
    os.makedirs(folder, exist_ok=True)
    if instance_id is not None:
        path = os.path.join(folder, f"instance-{_sanitize(instance_id)}.lock")
        fd = _lock(path)
        if fd is None:
            raise InstanceTaken(f"worker.instance_id {instance_id!r} is held by another worker on this host "
                                f"({path}): give each worker its own id (KPIMON_INSTANCE_ID)")
        return Instance(instance_id, path, fd)
    base = _sanitize(host if host is not None else socket.gethostname())
    for n in range(MAX_SLOTS):
        path = os.path.join(folder, f"instance-{n}.lock")
        fd = _lock(path)
        if fd is not None:
            return Instance(f"{base}-{n}", path, fd)
    raise InstanceTaken(f"all {MAX_SLOTS} worker slots under {folder} are held")


def for_settings(settings: Any) -> Instance | None:
    """The instance of a worker with ``settings``; None with ``worker.static_membership: false``."""
    w = settings.worker
    if not w.static_membership:
        return None
    return claim(w.state_dir, f"{settings.kafka.topic_prefix}{w.app_id}", w.instance_id)
