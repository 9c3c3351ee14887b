"""Engine settings from the environment: the log level, model aliases."""

from __future__ import annotations

import pytest

from flow_engine.config import ConfigError, Settings


@pytest.mark.parametrize(("given", "level"), [("debug", "DEBUG"), ("Error", "ERROR"), ("", "INFO")])
def test_log_level_from_the_environment_takes_any_case(given: str, level: str) -> None:
    assert Settings.load(environ={"FLOW_ENGINE_LOG_LEVEL": given}).log_level == level


def test_an_unknown_log_level_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="FLOW_ENGINE_LOG_LEVEL: log level must be one of"):
        Settings.load(environ={"FLOW_ENGINE_LOG_LEVEL": "loud"})


def test_model_aliases_map_the_names_flows_use_to_the_endpoints() -> None:
    settings = Settings.load(environ={
        "FLOW_ENGINE_MODEL_ALIASES": "gpt-4o-mini=llama3.1:8b, gpt-4o = llama3.1:70b"})
    assert settings.aliases == {"gpt-4o-mini": "llama3.1:8b", "gpt-4o": "llama3.1:70b"}
    assert settings.build_context.model_aliases == settings.aliases
    assert Settings.load(environ={}).aliases == {}


@pytest.mark.parametrize(("raw", "words"), [
    ("gpt-4o-mini", "is not name=model"),
    ("=llama3.1:8b", "is not name=model"),
    ("gpt-4o-mini=", "is not name=model"),
    ("a=b,a=c", "'a' is given twice"),
])
def test_a_bad_model_alias_stops_the_engine_with_the_variables_name(raw, words) -> None:
    settings = Settings.load(environ={"FLOW_ENGINE_MODEL_ALIASES": raw,
                                      "FLOW_ENGINE_API_KEYS": "ops:admin:a-long-enough-secret"})
    with pytest.raises(ConfigError, match=f"FLOW_ENGINE_MODEL_ALIASES: .*{words}"):
        settings.check()
