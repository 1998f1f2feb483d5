"""Shared lifecycle of a locally launched service process.

:class:`ManagedProcess` owns one child process and one private work directory:

* ``start()`` makes the work directory, lets the subclass write its config
  and build the command line (:meth:`ManagedProcess._prepare`), launches the
  process with stdout and stderr going to ``<workdir>/<name>.log``, and polls
  :meth:`ManagedProcess._probe` until the service really answers;
* ``stop()`` sends SIGTERM to the process (by PID), waits, falls back to
  SIGKILL, and removes the work directory;
* ``restart()`` stops the process and launches the same command line again,
  keeping the work directory and therefore the ports and any on-disk data.

If the process exits or does not become ready in time, startup raises
:class:`ServiceStartError` (a ``RuntimeError``) whose message ends with the
tail of the log. Startup is retried with fresh ports when the log shows a
port clash (``free_port()`` can race with other processes).

Set ``KPIMON_KEEP_SERVICE_DIRS=1`` to keep work directories after ``stop()``
for debugging.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import ClassVar, Self

from kpimon.errors import KpimonError

_RUNNING: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()
_RUNNING_LOCK = threading.Lock()


class ServiceStartError(KpimonError, RuntimeError):
    """A service process exited or did not become ready during startup."""


def _stop_leftovers() -> None:
    with _RUNNING_LOCK:
        leftovers = list(_RUNNING)
    for svc in leftovers:
        try:
            svc.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_stop_leftovers)


class ManagedProcess:
    """Base class: one child process, one work dir, readiness polling.

    Subclasses set :attr:`name` and implement :meth:`_prepare` and
    :meth:`_probe`; they may override :meth:`_env`.
    """

    #: short service name, used for the work dir prefix and the log file name
    name: ClassVar[str] = "service"
    #: substrings in the log that mean "a port we picked was already taken"
    port_conflict_markers: ClassVar[tuple[str, ...]] = ("Address already in use",)
    #: how often startup is retried after a port clash (fresh ports each time)
    port_conflict_attempts: ClassVar[int] = 3
    #: seconds between readiness probes
    probe_interval: ClassVar[float] = 0.05

    def __init__(self, *, startup_timeout: float = 30.0, stop_timeout: float = 15.0) -> None:
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._argv: list[str] | None = None
        self._last_probe_error: BaseException | None = None
        #: seconds the last successful start()/restart() took until ready
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ hooks
    def _prepare(self, workdir: Path, attempt: int) -> list[str]:
        """Write config files into ``workdir`` and return the command line.

        Called once per start attempt (``attempt`` counts from 0); allocate
        free ports here so that a retry after a port clash gets new ones.
        """
        raise NotImplementedError

    def _probe(self) -> bool:
        """Return True once the service answers. Exceptions count as "not yet"."""
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """Environment for the child; None inherits ours."""
        return None

    def _can_pick_new_ports(self) -> bool:
        """False when the caller fixed the ports (retrying would not help)."""
        return getattr(self, "_fixed_port", None) is None

    # ------------------------------------------------------------- properties
    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        """The file that receives the process's stdout and stderr."""
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def argv(self) -> list[str]:
        if self._argv is None:
            raise RuntimeError(f"{self.name} is not started")
        return list(self._argv)

    # -------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        """Start the service and block until it is ready. Idempotent."""
        if self.running:
            return self
        if self._workdir is not None:  # stopped via stop_process(): relaunch as-is
            self._launch()
            return self
        for attempt in range(self.port_conflict_attempts):
            self._workdir = Path(tempfile.mkdtemp(prefix=f"kpimon-{self.name}-"))
            try:
                self._argv = self._prepare(self._workdir, attempt)
                self._launch()
                return self
            except ServiceStartError as exc:
                clash = self._log_has_port_conflict()
                self._cleanup_workdir()
                if clash and self._can_pick_new_ports() and attempt + 1 < self.port_conflict_attempts:
                    continue
                raise exc
            except BaseException:
                self._kill_process()
                self._cleanup_workdir()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and remove the work dir."""
        self.stop_process()
        self._cleanup_workdir()

    def stop_process(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop only the process and keep the work dir; return its exit code.

        ``sig=signal.SIGKILL`` simulates a crash. ``start()`` or ``restart()``
        later relaunches the same command line on the same ports and data.
        """
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            return proc.returncode
        finally:
            self._proc = None
            with _RUNNING_LOCK:
                _RUNNING.discard(self)

    def restart(self) -> Self:
        """Stop the process and start the same command line again.

        Ports, work directory and on-disk state are kept.
        """
        if self._workdir is None or self._argv is None:
            raise RuntimeError(f"{self.name} was never started; call start() first")
        self.stop_process()
        self._launch()
        return self

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log ('' if there is none)."""
        if self._workdir is None:
            return ""
        try:
            with open(self.log_path, "rb") as fh:
                tail = deque(fh, maxlen=lines)
        except OSError:
            return ""
        return b"".join(tail).decode("utf-8", "replace")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {state} workdir={self._workdir}>"

    # -------------------------------------------------------------- internals
    def _launch(self) -> None:
        assert self._argv is not None
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"--- kpimon: launching {' '.join(self._argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env(),
                start_new_session=True,  # a ^C in the terminal does not hit it
            )
        with _RUNNING_LOCK:
            _RUNNING.add(self)
        self._wait_ready(started)
        self.startup_seconds = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        deadline = started + self.startup_timeout
        self._last_probe_error = None
        while True:
            proc = self._proc
            assert proc is not None
            code = proc.poll()
            if code is not None:
                self._fail(f"exited with code {code} during startup")
            try:
                if self._probe():
                    return
            except Exception as exc:  # noqa: BLE001 - "not ready yet"
                self._last_probe_error = exc
            if time.monotonic() >= deadline:
                self._fail(f"was not ready after {self.startup_timeout:.0f}s")
            time.sleep(self.probe_interval)

    def _fail(self, reason: str) -> None:
        tail = self.log_tail()
        last = self._last_probe_error
        self._kill_process()
        msg = f"{self.name} {reason}"
        if last is not None:
            msg += f" (last readiness check: {type(last).__name__}: {last})"
        msg += f"\n--- last lines of {self.log_path} ---\n{tail.rstrip() or '(empty log)'}"
        raise ServiceStartError(msg)

    def _kill_process(self) -> None:
        self.stop_process(signal.SIGKILL)

    def _log_has_port_conflict(self) -> bool:
        text = self.log_tail(200)
        return any(marker in text for marker in self.port_conflict_markers)

    def _cleanup_workdir(self) -> None:
        workdir, self._workdir = self._workdir, None
        if workdir is not None and not os.environ.get("KPIMON_KEEP_SERVICE_DIRS"):
            shutil.rmtree(workdir, ignore_errors=True)


def cache_root() -> Path:
    """Where downloaded artefacts are kept: ``$KPIMON_CACHE`` or ``~/.cache/kpimon``."""
    env = os.environ.get("KPIMON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kpimon"


def require_executable(path_or_name: str, what: str) -> str:
    """Resolve an executable or raise a RuntimeError telling how to install it."""
    found = shutil.which(path_or_name)
    if found is None:
        raise RuntimeError(
            f"{path_or_name!r} not found on PATH; it is needed for {what}. "
            f".ci/run installs it (see docs/operations.md)."
        )
    return found
