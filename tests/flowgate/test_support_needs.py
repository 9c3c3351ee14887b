"""tests/support/needs.py: one rule for a missing Redis, PostgreSQL or tool — skip on a
developer's machine, fail under CI — and one reading of ``CI`` for every test."""

from __future__ import annotations

import pytest
from support.needs import in_ci, missing, require_redis


@pytest.mark.parametrize("value", [None, "", "0", "false", "False", "FALSE", "no", " false "])
def test_ci_unset_or_false_is_not_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        missing("redis-server is not installed")


@pytest.mark.parametrize("value", ["true", "1", "yes", "True"])
def test_ci_set_fails_what_would_be_skipped(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        missing("redis-server is not installed")


def test_an_unreachable_redis_is_missing(monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="Redis is not reachable at redis://127"):
        require_redis("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_redis("redis://127.0.0.1:1/0", socket_connect_timeout=1)


def test_a_reachable_redis_is_a_client(redis_url):
    client = require_redis(redis_url, decode_responses=True)
    try:
        assert client.ping() is True
    finally:
        client.close()
