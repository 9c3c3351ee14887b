"""Ambassador unit-test fixtures: a fake clock and sleep, a scripted fake ``next`` handler,
request and settings builders, a real Redis (127.0.0.1:6379) with per-test key prefixes
(required under CI), and the app against a tiny in-test engine (``engine``, ``make_app``).

Only time and the downstream handler are faked; Redis-backed stores talk to the real Redis.
"""

from __future__ import annotations

import dataclasses
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from app_harness import SERVICE_KEY, ClosingClient, FakeEngine
from prometheus_client import CollectorRegistry
from support.needs import require_redis

from ambassador.app import create_app
from ambassador.chain import Request, Response
from ambassador.config import Settings, load
from ambassador.metrics import AmbassadorMetrics

REDIS_URL = "redis://127.0.0.1:6379/0"


class FakeClock:
    """A clock that only moves when told to (``advance``); also usable as a fake sleep."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        """Record the delay and let that much fake time pass (nothing really waits)."""
        self.sleeps.append(seconds)
        self.now += seconds


@dataclasses.dataclass
class Call:
    """One request as the downstream saw it (headers and ctx copied at call time)."""

    request: Request
    headers: dict[str, str]
    ctx: dict[str, Any]


class Downstream:
    """A fake ``next``: records every request and answers from a script.

    Each script item is a ``Response`` (a fresh copy is returned each time, since filters
    add headers to what they get) or a callable ``request -> Response``. The last item
    repeats once the script runs out.
    """

    def __init__(self, *script: Response | Callable[[Request], Response]) -> None:
        self.script = list(script) or [Response(200, {"Content-Type": "application/json"}, b"{}")]
        self.calls: list[Call] = []

    def __call__(self, request: Request) -> Response:
        self.calls.append(Call(request, dict(request.headers), dict(request.ctx)))
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if callable(item) and not isinstance(item, Response):
            return item(request)
        return dataclasses.replace(item, headers=dict(item.headers), meta=dict(item.meta))

    @property
    def count(self) -> int:
        return len(self.calls)


def make_request(flow_id: str | None = "faq", *, method: str = "POST", route: str = "/run-flow",
                 body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                 stream: bool = False, ctx: dict[str, Any] | None = None) -> Request:
    """A request as the /run-flow route builds it (header names lower-case)."""
    if body is None and route == "/run-flow":
        body = {"input_value": "hello"}
    path = f"/api/v1/run/{flow_id}" if route == "/run-flow" else "/api/v1/runs/r1/events"
    return Request(method, path, {k.lower(): v for k, v in (headers or {}).items()}, route, body,
                   flow_id=flow_id, stream=stream, ctx=dict(ctx or {}))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def downstream() -> type[Downstream]:
    """The ``Downstream`` class: ``downstream(resp1, resp2, ...)`` builds a scripted fake."""
    return Downstream


@pytest.fixture
def request_for() -> Callable[..., Request]:
    return make_request


@pytest.fixture
def settings_with() -> Callable[..., Settings]:
    """``settings_with(**{"dotted.key": value})``: Settings via load() with no file or env."""

    def build(overrides: dict[str, Any] | None = None, **dotted: Any) -> Settings:
        return load(None, environ={}, overrides={**(overrides or {}), **dotted})

    return build


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """The shared Redis; skipped when it is down, except under CI (support/needs.py)."""
    client = require_redis(REDIS_URL, decode_responses=True, socket_connect_timeout=1,
                           socket_timeout=2)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"flowgate-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = list(redis_client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port on 127.0.0.1 where connections are refused, for the whole test: bound but not
    listening. (Bound once and released, as before, another process could take it before
    the test connects — and answer.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel's backlog) and never
    answers: a hung engine, without waiting for a clock."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s.getsockname()[1]


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    e = FakeEngine()
    e.thread.start()
    yield e
    e.server.shutdown()
    e.server.server_close()
    e.thread.join(timeout=5)


@pytest.fixture
def make_app(engine: FakeEngine, monkeypatch):
    """``make_app(**dotted)`` → (test client, Ambassador); upstream is the fake engine."""
    for name in ("AMBASSADOR_CONFIG", "AMBASSADOR_UPSTREAM_URL", "REDIS_URL", "AMBASSADOR_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AMBASSADOR_UPSTREAM_KEY", SERVICE_KEY)
    built = []

    def build(config: dict[str, Any] | None = None, *, path: str | None = None, **dotted: Any):
        overrides = {"upstream.url": engine.url, "retry.backoff_base_s": 0.001,
                     "retry.backoff_max_s": 0.001, **(config or {}), **dotted}
        app = create_app(overrides, path=path, metrics=AmbassadorMetrics(CollectorRegistry()))
        app.test_client_class = ClosingClient
        amb = app.extensions["ambassador"]
        built.append(amb)
        return app.test_client(), amb

    yield build
    for amb in built:
        amb.upstream.close()
