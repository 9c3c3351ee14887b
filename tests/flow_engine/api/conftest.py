"""Engine HTTP API fixtures: an app per test on each store backend, its test client, auth
headers, flow definitions and small helpers to read runs, SSE streams and metrics.

``app`` is built by ``create_app`` exactly as production builds it (only the database URL,
the API keys and a private metrics registry differ). SQLite lives in a file under
``tmp_path``; PostgreSQL gets a fresh schema per test (the URL's ``search_path`` points at
it) that is dropped with CASCADE afterwards. When PostgreSQL is unreachable the
``postgres`` cases skip, except under CI (``CI`` set), where they fail: a green CI run must
have exercised both backends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sseclient
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry
from support.prom import metric_value

from flow_engine.app import create_app
from flow_engine.auth import Principal, parse_key, principal_for
from flow_engine.metrics import EngineMetrics

API_KEYS = "test-key,second-key"
ECHO_PREFIX = "[echo: not an LLM] "


# -- flow definitions -----------------------------------------------------------------------


class FlowDefs:
    """Flow definitions the API tests create; all offline (echo) unless said otherwise."""

    @staticmethod
    def echo(template: str = "Q: {question}", **top: Any) -> dict[str, Any]:
        """ChatInput → PromptTemplate → ChatModel(echo) → ChatOutput; the output is the
        echo prefix plus the filled template."""
        return {
            **top,
            "nodes": [
                {"id": "in", "type": "ChatInput"},
                {"id": "p", "type": "PromptTemplate", "params": {"template": template}},
                {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
                {"id": "out", "type": "ChatOutput"},
            ],
            "edges": [
                {"source": "in", "target": "p"},
                {"source": "p", "target": "llm"},
                {"source": "llm", "target": "out"},
            ],
        }

    @staticmethod
    def json_parser(**top: Any) -> dict[str, Any]:
        """The echo model's answer fed to a JsonOutputParser: fails for non-JSON input."""
        return {
            **top,
            "nodes": [
                {"id": "in", "type": "ChatInput"},
                {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
                {"id": "parse", "type": "JsonOutputParser"},
                {"id": "out", "type": "ChatOutput"},
            ],
            "edges": [
                {"source": "in", "target": "llm"},
                {"source": "llm", "target": "parse"},
                {"source": "parse", "target": "out"},
            ],
        }

    @staticmethod
    def chat_memory(**top: Any) -> dict[str, Any]:
        """ChatInput + ChatHistory → ChatPromptTemplate → ChatModel(echo) → ChatOutput."""
        return {
            **top,
            "nodes": [
                {"id": "in", "type": "ChatInput"},
                {"id": "hist", "type": "ChatHistory"},
                {"id": "p", "type": "ChatPromptTemplate",
                 "params": {"system": "Earlier turns:\n{history}", "human": "{message}"}},
                {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
                {"id": "out", "type": "ChatOutput"},
            ],
            "edges": [
                {"source": "in", "target": "p", "target_input": "message"},
                {"source": "hist", "target": "p", "target_input": "history"},
                {"source": "p", "target": "llm"},
                {"source": "llm", "target": "out"},
            ],
        }

    @staticmethod
    def openai(**top: Any) -> dict[str, Any]:
        """ChatInput → ChatModel(openai, the engine's OPENAI_BASE_URL) → ChatOutput."""
        return {
            **top,
            "nodes": [
                {"id": "in", "type": "ChatInput"},
                {"id": "llm", "type": "ChatModel",
                 "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
                {"id": "out", "type": "ChatOutput"},
            ],
            "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}],
        }


@pytest.fixture
def defs() -> type[FlowDefs]:
    return FlowDefs


@pytest.fixture
def echo_prefix() -> str:
    return ECHO_PREFIX


# -- databases ------------------------------------------------------------------------------


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres")])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'engine.db'}"
    return request.getfixturevalue("postgres_url")


# -- the app --------------------------------------------------------------------------------


class ClosingClient(FlaskClient):
    """A test client that reads and closes every response before handing it over, as a WSGI
    server does once the body has gone out. The engine finishes work in the response's
    ``close()`` (it records a run after the client has its answer), so a test that looked
    at a response and then asked about its run would otherwise see the run unrecorded."""

    def open(self, *args: Any, buffered: bool = True, **kwargs: Any) -> Any:
        return super().open(*args, buffered=buffered, **kwargs)



@pytest.fixture
def make_app(database_url: str) -> Iterator[Callable[..., Flask]]:
    """Build engine apps on this test's database; extra config keys override the defaults.
    Their test clients are :class:`ClosingClient` s. Every app's connection pool is closed
    after the test (before its schema is dropped)."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        # no maintenance pass unless a test asks: it would race the runs a test leaves stale
        # nor a rollout controller (tests of rollouts drive it: eng.rollouts.run_once())
        config = {"maintenance_interval_s": 0, "rollout_interval_s": 0, **config}
        app = create_app({"database_url": database_url, "api_keys": API_KEYS, **config},
                         metrics=EngineMetrics(CollectorRegistry()))
        app.test_client_class = ClosingClient
        apps.append(app)
        return app

    yield make
    for app in apps:
        eng = app.extensions["flowgate"]
        if eng.runs.signals is not None:
            eng.runs.signals.stop()  # no listener outlives its test (and logs into the next)
        eng.maintenance.stop()
        eng.rollouts.stop()
        eng.runs.executor.outcomes.stop()
        eng.runs.executor.close()
        eng.store.close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": "Bearer test-key"}


@pytest.fixture
def caller() -> Principal:
    """Who ``auth`` is, for tests that call the run service directly."""
    return principal_for(parse_key("test-key"), None, None)


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def create_flow(client: FlaskClient, auth: dict[str, str]) -> Callable[[dict[str, Any]], dict]:
    """POST a definition and return the created flow (asserting 201)."""

    def create(definition: dict[str, Any]) -> dict[str, Any]:
        resp = client.post("/api/v1/flows", json=definition, headers=auth)
        assert resp.status_code == 201, resp.get_data(as_text=True)
        return resp.get_json()

    return create


@pytest.fixture
def run_flow(client: FlaskClient, auth: dict[str, str]) -> Callable[..., Any]:
    """POST /api/v1/run/{flow_ref} with ``body`` (a JSON value) and extra headers."""

    def run(flow_ref: str, body: Any = None, *, headers: dict[str, str] | None = None,
            query: str = "") -> Any:
        kwargs: dict[str, Any] = {"headers": {**auth, **(headers or {})}}
        if body is not None:
            kwargs["json"] = body
        return client.post(f"/api/v1/run/{flow_ref}{query}", **kwargs)

    return run


def _sse_events(response: Any) -> list[sseclient.Event]:
    return list(sseclient.SSEClient(response.iter_encoded()).events())


@pytest.fixture
def sse_events() -> Callable[[Any], list[sseclient.Event]]:
    """Parse a text/event-stream response with sseclient-py, chunk by chunk."""
    return _sse_events


@pytest.fixture
def event_data() -> Callable[[sseclient.Event], Any]:
    return lambda event: json.loads(event.data)


@pytest.fixture
def metric(client: FlaskClient) -> Callable[..., float]:
    """``metric(name, **labels)``: the sum of the GET /metrics samples with that name whose
    labels include ``labels`` (0.0 when there is none)."""

    def value(name: str, **labels: str) -> float:
        resp = client.get("/metrics")
        assert resp.status_code == 200
        return metric_value(resp.get_data(as_text=True), name, **labels)

    return value
