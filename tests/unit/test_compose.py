"""docker-compose.yml is valid (checked by docker-compose itself, no engine needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_validates_and_runs_the_official_kafka_image():
    env = dict(os.environ, GF_SECURITY_ADMIN_PASSWORD="from-the-environment")
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr.decode()
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert spec["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert (ROOT / "deploy" / "prometheus.yml").exists()


def test_compose_refuses_to_start_without_the_secret_from_the_environment():
    env = {k: v for k, v in os.environ.items() if k != "GF_SECURITY_ADMIN_PASSWORD"}
    out = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, env=env, cwd=ROOT)
    assert out.returncode != 0
    assert b"GF_SECURITY_ADMIN_PASSWORD" in out.stderr
