"""Engine settings from the environment: the log level."""

from __future__ import annotations

import pytest

from flow_engine.config import ConfigError, Settings


@pytest.mark.parametrize(("given", "level"), [("debug", "DEBUG"), ("Error", "ERROR"), ("", "INFO")])
def test_log_level_from_the_environment_takes_any_case(given: str, level: str) -> None:
    assert Settings.load(environ={"FLOW_ENGINE_LOG_LEVEL": given}).log_level == level


def test_an_unknown_log_level_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FLOW_ENGINE_LOG_LEVEL: log level must be one of"):
        Settings.load(environ={"FLOW_ENGINE_LOG_LEVEL": "loud"})
