"""A throwaway Prometheus server on loopback scraping given targets."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kpimon.agents.runtime.ports import LOOPBACK, free_port
from kpimon.agents.runtime.process import ManagedProcess, require_executable


class PrometheusServer(ManagedProcess):
    """``prometheus`` on ``127.0.0.1:<port>`` with a generated prometheus.yml.

    ``scrape_targets`` are ``"host:port"`` strings scraped at ``/metrics`` as
    job ``kpimon``; ``rule_files`` are loaded as they are (recording and
    alerting rules are evaluated every ``scrape_interval``).
    """

    name = "prometheus"
    host = LOOPBACK

    def __init__(
        self,
        scrape_targets: list[str],
        rule_files: list[str | os.PathLike[str]] | None = None,
        scrape_interval: str = "1s",
        *,
        port: int | None = None,
        job_name: str = "kpimon",
        extra_args: list[str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__(startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.scrape_targets = list(scrape_targets)
        self.rule_files = [Path(p).resolve() for p in (rule_files or [])]
        self.scrape_interval = scrape_interval
        self.job_name = job_name
        self.extra_args = list(extra_args or [])
        self._fixed_port = port
        self.port: int | None = port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self.port is None:
            raise RuntimeError("prometheus is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "prometheus.yml"

    def config_text(self) -> str:
        # JSON is valid YAML: no YAML library and no quoting pitfalls
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": self.job_name, "static_configs": [{"targets": self.scrape_targets}]}
            ],
        }
        return json.dumps(config, indent=2) + "\n"

    def _prepare(self, workdir: Path, attempt: int) -> list[str]:
        binary = require_executable("prometheus", "the Prometheus server used by tests and the demo")
        for rule_file in self.rule_files:
            if not rule_file.is_file():
                raise FileNotFoundError(f"rule file not found: {rule_file}")
        self.port = self._fixed_port or free_port()
        (workdir / "prometheus.yml").write_text(self.config_text(), encoding="utf-8")
        return [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
            *self.extra_args,
        ]

    def _probe(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
            return resp.status == 200

    # ------------------------------------------------------------------ API
    def api(self, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (raises on error)."""
        url = f"{self.url}/api/v1/{path.lstrip('/')}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise RuntimeError(f"prometheus {url}: HTTP {exc.code}: {detail}") from exc
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {url}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns ``data.result`` (a list of ``{metric, value}``)."""
        data = self.api("query", {"query": promql})
        result = data["result"]
        if data.get("resultType") == "scalar":
            return [{"metric": {}, "value": result}]
        return result

    def query_value(self, promql: str) -> float | None:
        """The single sample value of an instant query, or None if empty."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise ValueError(f"{promql!r} returned {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def wait_for_value(self, promql: str, timeout: float = 15.0, interval: float = 0.2) -> float:
        """Poll ``query_value`` until it returns a sample; raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.query_value(promql)
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no sample for {promql!r} within {timeout}s")
            time.sleep(interval)

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health and last error."""
        return self.api("targets")["activeTargets"]

    def reload(self) -> None:
        """Re-read prometheus.yml and the rule files (``POST /-/reload``)."""
        req = urllib.request.Request(f"{self.url}/-/reload", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass
