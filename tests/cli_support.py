"""What the CLI tests share: running the real ``kpimon`` app under typer's CliRunner."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from kpimon.agents.cli import app


@pytest.fixture(autouse=True)
def no_kpimon_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each CLI test sees only the KPIMON_* variables it sets itself."""
    for var in [v for v in os.environ if v.startswith("KPIMON_")]:
        monkeypatch.delenv(var)
    yield


def invoke(args: list[str], env: dict[str, str] | None = None):
    # catch_exceptions=False: an exception the command does not map fails the test with its traceback
    return CliRunner().invoke(app, args, env=env or {}, catch_exceptions=False)


def flat(text: str) -> str:
    """Output without rich's line wrapping."""
    return "".join(text.split())


class StandInWorker:
    """A stand-in worker: ``GET /api/kpis`` answers ``status`` with ``body``; other paths 404.

    ``paths`` lists every path asked, in order.
    """

    def __init__(self, body: bytes, status: int = 200) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                self.send_response(status if self.path == "/api/kpis" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.paths: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
