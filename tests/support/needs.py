"""One rule for tests that need something the machine may lack (Redis, PostgreSQL, a tool):
skip with the reason on a developer's machine, fail under CI, where a green run must have
exercised everything. "Under CI" is one check for every test: ``CI`` set to anything but
empty, ``0``, ``false`` or ``no`` (any case) — so ``CI=false`` on a laptop skips, and
``CI=true`` (what CI systems set) fails."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    import redis

NOT_CI = ("", "0", "false", "no")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in NOT_CI


def missing(reason: str) -> NoReturn:
    """Skip locally, fail under CI; ``reason`` says what is missing and how to provide it."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this test must run)", pytrace=False)
    pytest.skip(reason)


def require_redis(url: str, **client_options: Any) -> redis.Redis:
    """A client of the Redis at ``url`` that has answered PING (:func:`missing` otherwise);
    ``client_options`` go to ``redis.Redis.from_url``. The caller closes it."""
    import redis

    client = redis.Redis.from_url(url, **{"socket_connect_timeout": 2, **client_options})
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        missing(f"Redis is not reachable at {url} ({type(exc).__name__}: {exc}); start it or "
                "set FLOWGATE_TEST_REDIS_URL")
    return client
