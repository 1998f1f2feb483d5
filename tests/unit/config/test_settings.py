"""Config: defaults, validation messages naming file, key and fault, env overrides."""

from __future__ import annotations

import pytest

from kpimon.config.settings import DEFAULT_PATH, ConfigError, load

DAY = 86_400_000


def test_packaged_defaults_match_the_documented_values():
    s = load(DEFAULT_PATH, env={})
    assert s.timezone == "UTC"
    assert s.lateness == 5 * 60_000
    assert s.dedup_horizon == 7 * DAY
    assert s.lifecycle.thresholds == (7 * DAY, 14 * DAY, 30 * DAY, 90 * DAY)
    assert s.lifecycle.warning_state == "sleeping"
    assert s.channels == ("organic", "paid_search", "social", "email", "referral")
    assert s.retention.days == (1, 7, 30) and s.retention.cohort_horizon == 12


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("timezone: Mars/Base", "kpimon.yaml: timezone: unknown IANA timezone 'Mars/Base'"),
        ("lateness: 5x", "kpimon.yaml: lateness: invalid duration '5x'"),
        ("lateness: -1", "kpimon.yaml: lateness: must not be negative"),
        ("lifecycle: {silent_after: 7d, sleeping_after: 3d}",
         "kpimon.yaml: lifecycle: sleeping_after: must be greater than silent_after (7d)"),
        ("lifecycle: {warning_state: asleep}", "kpimon.yaml: lifecycle.warning_state: Input should be"),
        ("channels: [organic, 'bad label']", "kpimon.yaml: channels: 'bad label' is not a valid label value"),
        ("channels: [other]", "kpimon.yaml: channels: 'other' and 'unknown' are reserved"),
        ("colour: blue", "kpimon.yaml: colour: unknown key"),
        ("kafka: {partitions: 0}", "kpimon.yaml: kafka.partitions: Input should be greater than or equal to 1"),
        ("- a\n- b", "kpimon.yaml: <root>: expected a mapping of keys, got list"),
        ("timezone: [unclosed", "kpimon.yaml: not valid YAML"),
        ("retention: {days: [7, 400]}", "kpimon.yaml: retention.days: 400: a day count must be between"),
        ("retention: {days: [7, 7]}", "kpimon.yaml: retention.days: a day count is listed twice"),
        ("retention: {days: []}", "kpimon.yaml: retention.days: list at least one day count"),
        ("retention: {cohort_horizon: 0}", "kpimon.yaml: retention.cohort_horizon: Input should be greater than"),
    ],
    ids=["tz", "duration", "negative", "order", "warning-state", "label", "reserved", "unknown-key", "partitions",
         "root", "yaml", "retention-range", "retention-twice", "retention-empty", "cohort-horizon"],
)
def test_errors_name_file_key_and_fault(tmp_path, yaml_text, message):
    path = tmp_path / "kpimon.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load(tmp_path / "nope.yaml", env={})


def test_environment_overrides_connection_settings(tmp_path):
    path = tmp_path / "kpimon.yaml"
    path.write_text("kafka: {broker: 'kafka://file:9092'}\n")
    s = load(path, env={"KPIMON_BROKER": "kafka://env:9093", "KPIMON_REDIS_URL": "redis://r:1/0",
                        "KPIMON_WEB_PORT": "7000"})
    assert s.kafka.broker == "kafka://env:9093"
    assert s.kafka.bootstrap == "env:9093"
    assert s.redis.url == "redis://r:1/0"
    assert s.worker.web_port == 7000


def test_a_bad_environment_override_names_the_variable_not_the_file(tmp_path):
    path = tmp_path / "kpimon.yaml"
    path.write_text("worker: {web_port: 6066}\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={"KPIMON_WEB_PORT": "sixty"})
    assert str(err.value).startswith(f"KPIMON_WEB_PORT (overrides {path}: worker.web_port): ")
    assert "valid integer" in str(err.value)


def _refused(tmp_path, yaml_text, env=None) -> str:
    path = tmp_path / "kpimon.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load(path, env=env or {})
    return str(err.value).replace(str(path), "kpimon.yaml")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("worker: {poll_timeout: -1}", "kpimon.yaml: worker.poll_timeout: must be positive"),
        ("worker: {poll_timeout: 0}", "kpimon.yaml: worker.poll_timeout: must be positive"),
        ("worker: {tick_interval: 0s}", "kpimon.yaml: worker.tick_interval: must be positive"),
        ("worker: {session_timeout: 0s}", "kpimon.yaml: worker.session_timeout: must be positive"),
        ("max_future: -5", "kpimon.yaml: max_future: must not be negative"),
        ("lateness: 99999999999999999999d", "kpimon.yaml: lateness: must be at most 30d"),
        ("dedup_horizon: 3661d", "kpimon.yaml: dedup_horizon: must be at most 3660d"),
        ("max_future: 31d", "kpimon.yaml: max_future: must be at most 30d"),
        ("worker: {poll_timeout: 61s}", "kpimon.yaml: worker.poll_timeout: must be at most 1m"),
        ("worker: {tick_interval: 2h}", "kpimon.yaml: worker.tick_interval: must be at most 1h"),
        ("worker: {session_timeout: 31m}", "kpimon.yaml: worker.session_timeout: must be at most 30m"),
        ("lifecycle: {dead_after: 9999d}", "kpimon.yaml: lifecycle.dead_after: must be at most 3660d"),
    ],
    ids=["poll-negative", "poll-zero", "tick-zero", "session-zero", "future-negative", "lateness-absurd",
         "dedup-high", "future-high", "poll-high", "tick-high", "session-high", "dead-high"],
)
def test_durations_out_of_range_are_refused(tmp_path, yaml_text, message):
    assert _refused(tmp_path, yaml_text) == message


def test_zero_is_allowed_where_it_means_something(tmp_path):
    path = tmp_path / "kpimon.yaml"
    path.write_text("lateness: 0s\ndedup_horizon: 0s\nmax_future: 0s\n"
                    "lifecycle: {dead_after: 3660d}\nworker: {session_timeout: 30m, poll_timeout: 1m}\n")
    s = load(path, env={})
    assert (s.lateness, s.dedup_horizon, s.max_future) == (0, 0, 0)
    assert s.lifecycle.dead_after == 3660 * DAY


def test_duplicate_channels_are_refused(tmp_path):
    assert _refused(tmp_path, "channels: [organic, email, organic]") == \
        "kpimon.yaml: channels: 'organic' is listed twice"
    assert _refused(tmp_path, "event_types: [signup, signup]") == "kpimon.yaml: event_types: 'signup' is listed twice"


def test_a_key_given_twice_is_refused_with_path_and_line(tmp_path):
    # PyYAML's safe_load keeps the last value silently
    assert _refused(tmp_path, "lateness: 5m\nworker:\n  web_port: 6066\n  clock: live\n  web_port: 7000\n") == \
        "kpimon.yaml: worker.web_port: duplicate key at line 5 (first at line 3)"
    assert _refused(tmp_path, "lateness: 5m\nlateness: 1h\n") == \
        "kpimon.yaml: lateness: duplicate key at line 2 (first at line 1)"


@pytest.mark.parametrize(
    ("broker", "fault"),
    [
        ("localhost:9092", "no scheme"),
        ("kafka://host", "no port"),
        ("kafka://host:0", "no port"),
        ("kafka://host:99999", "no valid port (1-65535)"),
        ("kafka://host:abc", "no valid port (1-65535)"),
        ("http://host:9092", "scheme 'http://' is not kafka://"),
        ("kafka://h1:9092,http://h2:9092", "scheme 'http://' is not kafka://"),
        ("kafka://h1:9092;h2:9092", "separate brokers with commas, not ';'"),
        ("kafka://h1:9092,", "'' in 'kafka://h1:9092,': not host:port"),
        ("kafka://:9092", "no host"),
        ("kafka://host:9092/path", "not host:port"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_broker_must_be_a_kafka_url_list(tmp_path, broker, fault):
    message = _refused(tmp_path, f"kafka: {{broker: '{broker}'}}")
    assert message.startswith("kpimon.yaml: kafka.broker: ")
    assert fault in message
    assert "expected kafka://host:port" in message


@pytest.mark.parametrize(
    ("broker", "canonical", "bootstrap"),
    [
        ("kafka://127.0.0.1:9092", "kafka://127.0.0.1:9092", "127.0.0.1:9092"),
        ("kafka://h1:9092,h2:9093", "kafka://h1:9092,h2:9093", "h1:9092,h2:9093"),
        ("kafka://h1:9092, kafka://h2:9093", "kafka://h1:9092,h2:9093", "h1:9092,h2:9093"),
        ("kafka://[::1]:9092", "kafka://[::1]:9092", "[::1]:9092"),
    ],
)
def test_broker_lists_are_stored_in_one_form(tmp_path, broker, canonical, bootstrap):
    path = tmp_path / "kpimon.yaml"
    path.write_text(f"kafka: {{broker: '{broker}'}}")
    s = load(path, env={})
    assert s.kafka.broker == canonical
    assert s.kafka.bootstrap == bootstrap
    # what `kpimon send` and backfill do with it: strip the scheme once
    assert s.kafka.broker.split("://", 1)[-1] == bootstrap


def test_a_bad_broker_from_the_environment_is_refused(tmp_path):
    message = _refused(tmp_path, "", env={"KPIMON_BROKER": "localhost:9092"})
    assert message.startswith("KPIMON_BROKER (overrides kpimon.yaml: kafka.broker): 'localhost:9092': no scheme")
