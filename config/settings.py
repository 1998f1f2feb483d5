"""Validated, frozen configuration loaded once from ``kpimon.yaml``.

``load(path)`` raises :class:`ConfigError` whose message names the file, the
key and the fault, e.g.::

    config/kpimon.yaml: lifecycle: sleeping_after: must be greater than silent_after (7d)

Connection settings can be overridden from the environment (``KPIMON_BROKER``,
``KPIMON_REDIS_URL``, ``KPIMON_WEB_HOST``, ``KPIMON_WEB_PORT``,
``KPIMON_TOPIC_PREFIX``, ``KPIMON_STATE_DIR``, ``KPIMON_INSTANCE_ID``); secrets never live in the
file: the API token comes only from ``KPIMON_API_TOKEN`` and is excluded from dumps.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from kpimon.agents.core.durations import format_duration, parse_duration
from kpimon.errors import EXIT_CONFIG, KpimonError

DEFAULT_PATH = Path(__file__).with_name("kpimon.yaml")
STATES = ("active", "silent", "sleeping", "churned", "dead")


class ConfigError(KpimonError):
    """A configuration problem; the message names file, key and fault."""

    exit_code = EXIT_CONFIG


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


def _bounded(low: Literal["zero", "positive", None], high: str) -> AfterValidator:
    """Bounds of a duration key: ``low`` zero (>= 0), positive (> 0) or None (checked
    elsewhere); ``high`` the largest sane value (docs/configuration.md lists them)."""
    high_ms = parse_duration(high)

    def check(value: int) -> int:
        if low == "positive" and value <= 0:
            raise ValueError("must be positive")
        if low == "zero" and value < 0:
            raise ValueError("must not be negative")
        if value > high_ms:
            raise ValueError(f"must be at most {high}")
        return value

    return AfterValidator(check)


LatenessDuration = Annotated[Duration, _bounded("zero", "30d")]
DedupDuration = Annotated[Duration, _bounded("zero", "3660d")]
FutureDuration = Annotated[Duration, _bounded("zero", "30d")]
ThresholdDuration = Annotated[Duration, _bounded(None, "3660d")]  # > 0 and ordered: Lifecycle._ordered
PollDuration = Annotated[Duration, _bounded("positive", "1m")]
TickDuration = Annotated[Duration, _bounded("positive", "1h")]
LingerDuration = Annotated[Duration, _bounded("zero", "5s")]
SessionDuration = Annotated[Duration, _bounded("positive", "30m")]  # Kafka's group.max.session.timeout.ms
CheckpointDuration = Annotated[Duration, _bounded("positive", "1d")]

_BROKER_FORM = "expected kafka://host:port, several separated by commas (kafka://h1:9092,h2:9092)"


def _broker_list(value: str) -> str:
    """``kafka://host:port[,host:port...]``, returned in that canonical form.

    A later entry may repeat the ``kafka://`` scheme (it is dropped).  Everything
    that reads the setting splits it this way (``Kafka.bootstrap``, faust, and the
    commands that strip the scheme once), so other forms are refused here."""
    text = value.strip()
    if not text:
        raise ValueError(f"empty; {_BROKER_FORM}")
    if ";" in text:
        raise ValueError(f"{value!r}: separate brokers with commas, not ';'; {_BROKER_FORM}")
    hosts = []
    parts = [p.strip() for p in text.split(",")]
    for i, part in enumerate(parts):
        where = repr(part) if len(parts) == 1 else f"{part!r} in {value!r}"
        scheme, sep, rest = part.partition("://")
        if not sep:
            if i == 0:
                raise ValueError(f"{where}: no scheme; {_BROKER_FORM}")
            rest = part
        elif scheme != "kafka":
            raise ValueError(f"{where}: scheme {scheme + '://'!r} is not kafka://; {_BROKER_FORM}")
        if not rest or any(c in rest for c in "/?#@ "):
            raise ValueError(f"{where}: not host:port; {_BROKER_FORM}")
        try:
            parsed = urlsplit("//" + rest)
            port = parsed.port
        except ValueError:
            raise ValueError(f"{where}: no valid port (1-65535); {_BROKER_FORM}") from None
        if not parsed.hostname:
            raise ValueError(f"{where}: no host; {_BROKER_FORM}")
        if port is None or port == 0:
            raise ValueError(f"{where}: no port; {_BROKER_FORM}")
        hosts.append(rest)
    return "kafka://" + ",".join(hosts)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Lifecycle(_Model):
    silent_after: ThresholdDuration = parse_duration("7d")
    sleeping_after: ThresholdDuration = parse_duration("14d")
    churned_after: ThresholdDuration = parse_duration("30d")
    dead_after: ThresholdDuration = parse_duration("90d")
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


class Retention(_Model):
    """N-day retention and the signup-cohort table (docs/metrics.md)."""

    days: tuple[int, ...] = (1, 7, 30)
    cohort_horizon: int = Field(default=12, ge=1, le=104)

    @field_validator("days")
    @classmethod
    def _days(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("list at least one day count, e.g. [1, 7, 30]")
        if len(value) > 10:
            raise ValueError("at most 10 day counts")
        for n in value:
            if not 1 <= n <= 366:
                raise ValueError(f"{n}: a day count must be between 1 and 366")
        if len(set(value)) != len(value):
            raise ValueError("a day count is listed twice")
        return tuple(sorted(value))


class Activation(_Model):
    """Activation within a window (docs/metrics.md): a new user who purchases within ``window_days`` days."""

    window_days: int = Field(default=7, ge=1, le=366)


class Money(_Model):
    decimals: int = Field(default=2, ge=0, le=6)


class Kafka(_Model):
    broker: Annotated[str, AfterValidator(_broker_list)] = "kafka://127.0.0.1:9092"
    partitions: int = Field(default=4, ge=1, le=1024)
    topic_prefix: str = ""

    @property
    def bootstrap(self) -> str:
        """``host:port[,host:port]`` without the ``kafka://`` scheme."""
        return ",".join(part.split("://", 1)[-1] for part in self.broker.split(","))


def _default_state_dir() -> str:
    """``$XDG_STATE_HOME/kpimon``, or ``~/.local/state/kpimon``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "kpimon")


class Worker(_Model):
    app_id: str = Field(default="kpimon", pattern=r"^[A-Za-z0-9._-]+$")
    clock: Literal["live", "event"] = "live"
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=1, le=65535)
    batch_max_records: int = Field(default=20000, ge=1, le=100_000)
    poll_timeout: PollDuration = parse_duration("200ms")
    # After a poll that was not full, let records gather this long (from that poll's start) before the next one:
    # fewer, larger batches when the worker keeps up (Flink's buffer timeout plays the same part).
    poll_linger: LingerDuration = parse_duration("100ms")
    tick_interval: TickDuration = parse_duration("1s")
    session_timeout: SessionDuration = parse_duration("10s")
    # Local state of the worker: the dedup stores (<state_dir>/<topic_prefix><app_id>/dedup-<partition>).
    state_dir: Annotated[str, AfterValidator(os.path.expanduser)] = Field(default_factory=_default_state_dir,
                                                                          min_length=1)
    dedup_store: Literal["disk", "memory"] = "disk"  # memory: every id of the horizon in RAM (tests, tools)
    # Static group membership (agents/worker/instance.py): a restarted worker takes its partitions back at once
    # instead of after session_timeout.  instance_id: this worker's group.instance.id (default: <host>-<slot>).
    static_membership: bool = True
    instance_id: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._-]+$")
    # Checkpoints of each partition's engine (agents/worker/checkpoints.py): after this much time or this many
    # state-log records, whichever comes first; off: recovery replays the whole state log, nothing is deleted.
    checkpoints: bool = True
    checkpoint_interval: CheckpointDuration = parse_duration("1m")
    checkpoint_records: int = Field(default=5000, ge=1, le=10_000_000)


class Redis(_Model):
    url: str = "redis://127.0.0.1:6379/0"
    enabled: bool = True  # the serving layer (agents/serving/writer.py); false: the worker never talks to Redis
    key_prefix: str = "kpimon:"  # prepended to every key kpimon writes


class Api(_Model):
    """The HTTP API's bearer token: only from ``KPIMON_API_TOKEN``, never from the file, never dumped."""

    token: SecretStr | None = Field(default=None, exclude=True)


class Settings(_Model):
    timezone: str = "UTC"
    lateness: LatenessDuration = parse_duration("5m")
    dedup_horizon: DedupDuration = parse_duration("7d")
    max_future: FutureDuration = parse_duration("1d")
    min_epoch_ms: int = 946_684_800_000  # earliest *integer* ts accepted: 2000-01-01T00:00:00Z (see _epoch_floor)
    lifecycle: Lifecycle = Lifecycle()
    retention: Retention = Retention()
    activation: Activation = Activation()
    channels: tuple[str, ...] = ("organic", "paid_search", "social", "email", "referral")
    event_types: tuple[str, ...] = ("signup", "purchase", "refund", "invite", "login", "page_view", "session_start",
                                    "app_open")
    money: Money = Money()
    kafka: Kafka = Kafka()
    worker: Worker = Worker()
    redis: Redis = Redis()
    api: Api = Api()
    kpis: str | None = None  # path of the KPI spec (config/kpis.yaml format), relative to this file
    source: str = Field(default="<defaults>", exclude=True)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone {value!r}") from None
        return value

    @field_validator("min_epoch_ms", mode="before")
    @classmethod
    def _epoch_floor(cls, value: Any) -> int:
        """Epoch milliseconds (>= 0), or an instant with an offset (YAML reads one as a datetime)."""
        import datetime as dt

        from kpimon.streams.events import parse_instant

        form = "expected epoch milliseconds or an RFC 3339 instant with an offset, like 2000-01-01T00:00:00Z"
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            value = value.isoformat()
        if isinstance(value, str):
            try:
                value = parse_instant(value)
            except ValueError:
                raise ValueError(f"{value!r}: {form}") from None
        if isinstance(value, (dt.date, dt.datetime)):
            raise ValueError(f"{value.isoformat()}: no offset; {form}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r}: {form}")
        if not 0 <= value <= 4_102_444_800_000:
            raise ValueError(f"{value}: must be between 0 (1970-01-01) and 4102444800000 (2100-01-01)")
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
        seen: set[str] = set()
        for item in value:
            if item in seen:
                raise ValueError(f"{item!r} is listed twice")
            seen.add(item)
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

    def load_kpis(self):
        from kpimon.config.kpi_loading import load_kpis

        path = self.kpis_path()
        if path is None:
            return None
        if not path.exists():
            raise ConfigError(f"{self.source}: kpis: no such file {str(path)!r}")
        return load_kpis(path, channels=self.channels, retention_days=self.retention.days)

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
    "KPIMON_STATE_DIR": ("worker", "state_dir"),
    "KPIMON_INSTANCE_ID": ("worker", "instance_id"),
}


API_TOKEN_ENV = "KPIMON_API_TOKEN"  # bearer token of the per-user HTTP endpoints (agents/http/api.py)


def _format_error(source: str, err: ValidationError, from_env: dict[str, str] | None = None) -> str:
    """One line per problem: ``file: key: what is wrong`` (or the environment variable that set the key)."""
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        var = (from_env or {}).get(key)
        where = f"{var} (overrides {source}: {key})" if var else f"{source}: {key}"
        lines.append(f"{where}: {msg}")
    return "\n".join(lines)


def from_mapping(data: dict[str, Any], source: str = "<mapping>", env: dict[str, str] | None = None) -> Settings:
    """Validate a mapping (as read from YAML), apply environment overrides.

    The overrides are the few ``KPIMON_*`` variables of ``_ENV`` (deployment
    facts: where the broker and Redis are, the ports) plus the API token, read
    here rather than through pydantic-settings so that an error names the file
    *or* the variable that set the bad value, and the secret can never come
    from the file.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if isinstance(merged.get("api"), dict) and "token" in merged["api"]:
        raise ConfigError(f"{source}: api.token: secrets never live in the file; set {API_TOKEN_ENV} instead")
    environ = os.environ if env is None else env
    from_env: dict[str, str] = {}
    for var, (section, key) in _ENV.items():
        value = environ.get(var)
        if value:
            merged.setdefault(section, {})
            if isinstance(merged[section], dict):
                merged[section][key] = value
                from_env[f"{section}.{key}"] = var
    token = environ.get(API_TOKEN_ENV)
    if token:
        merged.setdefault("api", {})
        if isinstance(merged["api"], dict):
            merged["api"]["token"] = token
            from_env["api.token"] = API_TOKEN_ENV
    try:
        return Settings(**merged, source=source)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err, from_env)) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(f"{key}: duplicate key at line {line} (first at line {first})")
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML
    keeps the last one silently).  The error names the key's dotted path (list
    items by their ``id`` or ``kpi``, else their position) and both lines."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._paths: dict[int, str] = {}

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        self._index(node, "")
        return self.construct_document(node)

    def _index(self, node: yaml.Node, path: str) -> None:
        stack = [(node, path)]
        while stack:
            node, path = stack.pop()
            if id(node) in self._paths:
                continue  # an alias: named after its anchor
            self._paths[id(node)] = path
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                    stack.append((value, f"{path}.{name}" if path else str(name)))
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    name = str(i)
                    if isinstance(item, yaml.MappingNode):
                        ids = [v.value for k, v in item.value if isinstance(k, yaml.ScalarNode)
                               and k.value in ("id", "kpi") and isinstance(v, yaml.ScalarNode) and v.value]
                        name = ids[0] if ids else name
                    stack.append((item, f"{path}.{name}" if path else name))

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges; explicit keys after it override by design
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # an unhashable key: SafeLoader reports it
                if first != key_node.start_mark.line + 1:
                    path = self._paths.get(id(node), "")
                    name = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key)
                    raise _DuplicateKey(f"{path}.{name}" if path else name, key_node.start_mark.line + 1, first)
        return super().construct_mapping(node, deep=deep)


def _exact_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    """A YAML float as the exact decimal written (``0.1`` is 1/10), never through a binary float."""
    text = str(loader.construct_scalar(node)).replace("_", "").lower()
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    if text == ".inf":
        return Decimal(sign) * Decimal("Infinity")
    if text == ".nan":
        return Decimal("NaN")
    if ":" in text:  # YAML 1.1 base 60: 1:30.5
        value = Decimal(0)
        for part in text.split(":"):
            value = value * 60 + Decimal(part)
        return sign * value
    return sign * Decimal(text)


class _ExactLoader(_Loader):
    """:class:`_Loader` that reads floats as :class:`decimal.Decimal` (the KPI spec)."""


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _exact_float)


def read_yaml(path: Path, exact: bool = False) -> Any:
    """A YAML file's data (``{}`` when empty); ConfigError naming the file otherwise.

    A key given twice in one mapping is an error (``<file>: <key path>: duplicate
    key at line N (first at line M)``).  ``exact``: floats are read as
    ``decimal.Decimal`` from their text (``0.2000000000000000001`` stays that)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        data = yaml.load(text, Loader=_ExactLoader if exact else _Loader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return {} if data is None else data


def load(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Load and validate a YAML file (default: the packaged ``config/kpimon.yaml``)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    return from_mapping(read_yaml(path), str(path), env)
