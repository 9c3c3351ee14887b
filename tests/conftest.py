"""Shared fixtures: a real LLM simulator process (flowgate.llm_sim) for the whole session,
and fresh PostgreSQL schemas for the tests that run on both store backends."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql
from support.needs import missing
from support.procs import ServerProcess, start_owned

from flowgate.llm_sim import SimSettings


def pytest_unconfigure(config) -> None:
    """Background threads of apps the tests built (outcome flushers, retries) may still log
    after pytest has closed the streams it captured: drop those lines instead of printing
    a "Logging error" traceback for each."""
    logging.raiseExceptions = False


class LlmSim:
    """Handle on a running simulator: URLs plus its /sim/* test endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url  # http://127.0.0.1:PORT
        self.base_url = url + "/v1"  # what openai / langchain_openai take as base_url

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/sim/stats")

    def reset(self) -> dict[str, Any]:
        """Zero the counters and forget recorded requests (settings are left alone)."""
        return self._call("POST", "/sim/reset")

    def requests(self) -> list[dict[str, Any]]:
        """The chat completion requests seen since the last reset: body, headers, remote_port."""
        resp = requests.get(self.url + "/sim/requests", timeout=10)
        resp.raise_for_status()
        return resp.json()

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change SimSettings fields at runtime; returns the full settings now in force."""
        return self._call("POST", "/sim/config", settings)

    def restore_defaults(self) -> None:
        """Counters to zero and every setting back to SimSettings() defaults."""
        self.configure(**dataclasses.asdict(SimSettings()))
        self.reset()

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        resp = requests.request(method, self.url + path, json=body, timeout=10)
        resp.raise_for_status()
        return resp.json()


@pytest.fixture(scope="session")
def llm_sim() -> Iterator[LlmSim]:
    """One simulator process (gunicorn + gevent, 1 worker) for the test session."""
    proc = start_owned(lambda port: ServerProcess(
        [sys.executable, "-m", "flowgate.llm_sim", "--port", str(port)],
        port=port, ready_path="/sim/stats", name="llm-sim"))
    try:
        yield LlmSim(proc.url)
    finally:
        proc.stop()


@pytest.fixture
def fresh_llm_sim(llm_sim: LlmSim) -> Iterator[LlmSim]:
    """The session simulator with zeroed counters and default settings (before and after).
    Streams a test left open (a run it cancelled, a client it dropped) end first: closed
    late, one would be counted in the next test's ``streams_closed_early``."""
    llm_sim.restore_defaults()
    yield llm_sim
    _let_streams_end(llm_sim)
    llm_sim.restore_defaults()


def _let_streams_end(sim: LlmSim, timeout_s: float = 10.0) -> None:
    """Best effort and bounded: a stream held on purpose (a hang) only costs the wait."""
    deadline = time.monotonic() + timeout_s
    while sim.stats().get("active_streams", 0) > 0 and time.monotonic() < deadline:
        time.sleep(0.02)


# -- PostgreSQL -----------------------------------------------------------------------------

POSTGRES_URL = os.environ.get("FLOWGATE_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[psycopg.Connection]:
    """An autocommit connection for creating and dropping test schemas."""
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        missing(f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc.__class__.__name__}: "
                f"{str(exc).strip()}); start it or set FLOWGATE_TEST_POSTGRES_URL")
    with conn:
        yield conn


@pytest.fixture
def postgres_url(postgres_admin: psycopg.Connection) -> Iterator[str]:
    """The URL of a fresh, empty schema; dropped with everything in it after the test."""
    schema = f"flowgate_test_{uuid.uuid4().hex[:16]}"
    postgres_admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        postgres_admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


# -- Redis ------------------------------------------------------------------------------------

REDIS_URL = os.environ.get("FLOWGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared test Redis (keys of each test are its own: run ids, prefixes)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        missing(f"Redis is not reachable at {REDIS_URL} ({type(exc).__name__}: {exc}); start "
                "it or set FLOWGATE_TEST_REDIS_URL")
    return REDIS_URL
