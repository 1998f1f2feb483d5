pytest_plugins = ["tests.fixtures_services"]


import pytest  # noqa: E402 - after pytest_plugins, which pytest reads first


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """The worker's default ``worker.state_dir`` (its dedup stores) is a fresh directory per test, never ~/.local."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))
    monkeypatch.delenv("KPIMON_STATE_DIR", raising=False)
