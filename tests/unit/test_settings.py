"""Config: defaults, validation messages naming file, key and fault, env overrides."""

from __future__ import annotations

import pytest

from config.settings import DEFAULT_PATH, ConfigError, load

DAY = 86_400_000


def test_packaged_defaults_match_the_documented_values():
    s = load(DEFAULT_PATH, env={})
    assert s.timezone == "UTC"
    assert s.lateness == 5 * 60_000
    assert s.dedup_horizon == 7 * DAY
    assert s.lifecycle.thresholds == (7 * DAY, 14 * DAY, 30 * DAY, 90 * DAY)
    assert s.lifecycle.warning_state == "sleeping"
    assert s.channels == ("organic", "paid_search", "social", "email", "referral")


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
    ],
    ids=["tz", "duration", "negative", "order", "warning-state", "label", "reserved", "unknown-key", "partitions",
         "root", "yaml"],
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
