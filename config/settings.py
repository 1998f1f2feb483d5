"""Validated, frozen configuration loaded once from ``kpimon.yaml``.

``load(path)`` raises :class:`ConfigError` whose message names the file, the
key and the fault, e.g.::

    config/kpimon.yaml: lifecycle: sleeping_after: must be greater than silent_after (7d)

Connection settings can be overridden from the environment (``KPIMON_BROKER``,
``KPIMON_REDIS_URL``, ``KPIMON_WEB_HOST``, ``KPIMON_WEB_PORT``,
``KPIMON_TOPIC_PREFIX``); secrets never live in the file: the API token comes
only from ``KPIMON_API_TOKEN`` and is excluded from dumps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)

from agents.core.periods import format_duration, parse_duration

DEFAULT_PATH = Path(__file__).with_name("kpimon.yaml")
STATES = ("active", "silent", "sleeping", "churned", "dead")


class ConfigError(Exception):
    """A configuration problem; the message names file, key and fault."""


def _duration(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 7d")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError("expected a duration like 30s, 5m, 7d")


Duration = Annotated[int, BeforeValidator(_duration)]
"""A duration in milliseconds; written in YAML as ``500ms``, ``30s``, ``5m``, ``2h``, ``7d``."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Lifecycle(_Model):
    silent_after: Duration = parse_duration("7d")
    sleeping_after: Duration = parse_duration("14d")
    churned_after: Duration = parse_duration("30d")
    dead_after: Duration = parse_duration("90d")
    warning_state: Literal["silent", "sleeping", "churned", "dead"] = "sleeping"

    @model_validator(mode="after")
    def _ordered(self) -> Lifecycle:
        names = ("silent_after", "sleeping_after", "churned_after", "dead_after")
        values = [getattr(self, n) for n in names]
        if values[0] <= 0:
            raise ValueError("silent_after: must be positive")
        for (prev, a), (name, b) in zip(zip(names, values), list(zip(names, values))[1:]):
            if b <= a:
                raise ValueError(f"{name}: must be greater than {prev} ({format_duration(a)})")
        return self

    @property
    def thresholds(self) -> tuple[int, int, int, int]:
        return (self.silent_after, self.sleeping_after, self.churned_after, self.dead_after)


class Money(_Model):
    decimals: int = Field(2, ge=0, le=6)


class Kafka(_Model):
    broker: str = "kafka://127.0.0.1:9092"
    partitions: int = Field(4, ge=1, le=1024)
    topic_prefix: str = ""

    @property
    def bootstrap(self) -> str:
        """``host:port[,host:port]`` without the ``kafka://`` scheme."""
        return ",".join(part.split("://", 1)[-1] for part in self.broker.split(","))


class Worker(_Model):
    app_id: str = Field("kpimon", pattern=r"^[A-Za-z0-9._-]+$")
    clock: Literal["live", "event"] = "live"
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1, le=65535)
    batch_max_records: int = Field(20000, ge=1, le=100_000)
    poll_timeout: Duration = parse_duration("200ms")
    tick_interval: Duration = parse_duration("1s")
    session_timeout: Duration = parse_duration("10s")


class Redis(_Model):
    url: str = "redis://127.0.0.1:6379/0"
    enabled: bool = True  # the serving layer (agents/serving.py); false: the worker never talks to Redis
    key_prefix: str = "kpimon:"  # prepended to every key kpimon writes


class Api(_Model):
    """The HTTP API's bearer token: only from ``KPIMON_API_TOKEN``, never from the file, never dumped."""

    token: SecretStr | None = Field(None, exclude=True)


class Settings(_Model):
    timezone: str = "UTC"
    lateness: Duration = parse_duration("5m")
    dedup_horizon: Duration = parse_duration("7d")
    max_future: Duration = parse_duration("1d")
    lifecycle: Lifecycle = Lifecycle()
    channels: tuple[str, ...] = ("organic", "paid_search", "social", "email", "referral")
    event_types: tuple[str, ...] = ("signup", "purchase", "refund", "invite", "login", "page_view", "session_start",
                                    "app_open")
    money: Money = Money()
    kafka: Kafka = Kafka()
    worker: Worker = Worker()
    redis: Redis = Redis()
    api: Api = Api()
    kpis: str | None = None  # path of the KPI spec (config/kpis.yaml format), relative to this file
    source: str = Field("<defaults>", exclude=True)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone {value!r}") from None
        return value

    @field_validator("lateness", "dedup_horizon", "max_future")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("channels", "event_types")
    @classmethod
    def _labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > 50:
            raise ValueError("at most 50 entries (they become Prometheus label values)")
        for item in value:
            if not item or not item.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"{item!r} is not a valid label value (letters, digits, _ and -)")
        if "other" in value or "unknown" in value:
            raise ValueError("'other' and 'unknown' are reserved")
        return value

    def kpis_path(self) -> Path | None:
        """The KPI spec's path, resolved against the config file's folder."""
        if self.kpis is None:
            return None
        path = Path(self.kpis)
        if path.is_absolute():
            return path
        base = DEFAULT_PATH.parent if self.source.startswith("<") else Path(self.source).parent
        return base / path

    def load_kpis(self):  # noqa: ANN201 - config.kpis.KpiSpec | None
        from config.kpis import load_kpis

        path = self.kpis_path()
        if path is None:
            return None
        if not path.exists():
            raise ConfigError(f"{self.source}: kpis: no such file {str(path)!r}")
        return load_kpis(path, channels=self.channels)

    def channel_label(self, channel: str | None) -> str:
        if channel is None:
            return "unknown"
        return channel if channel in self.channels else "other"


_ENV = {
    "KPIMON_BROKER": ("kafka", "broker"),
    "KPIMON_TOPIC_PREFIX": ("kafka", "topic_prefix"),
    "KPIMON_REDIS_URL": ("redis", "url"),
    "KPIMON_WEB_HOST": ("worker", "web_host"),
    "KPIMON_WEB_PORT": ("worker", "web_port"),
    "KPIMON_APP_ID": ("worker", "app_id"),
}


API_TOKEN_ENV = "KPIMON_API_TOKEN"  # bearer token of the per-user HTTP endpoints (agents/api.py)


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def from_mapping(data: dict[str, Any], source: str = "<mapping>", env: dict[str, str] | None = None) -> Settings:
    """Validate a mapping (as read from YAML), apply environment overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if isinstance(merged.get("api"), dict) and "token" in merged["api"]:
        raise ConfigError(f"{source}: api.token: secrets never live in the file; set {API_TOKEN_ENV} instead")
    environ = os.environ if env is None else env
    for var, (section, key) in _ENV.items():
        value = environ.get(var)
        if value:
            merged.setdefault(section, {})
            if isinstance(merged[section], dict):
                merged[section][key] = value
    token = environ.get(API_TOKEN_ENV)
    if token:
        merged.setdefault("api", {})
        if isinstance(merged["api"], dict):
            merged["api"]["token"] = token
    try:
        return Settings(**merged, source=source)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def read_yaml(path: Path) -> Any:
    """A YAML file's data (``{}`` when empty); ConfigError naming the file otherwise."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return {} if data is None else data


def load(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Load and validate a YAML file (default: the packaged ``config/kpimon.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    return from_mapping(read_yaml(path), str(path), env)
