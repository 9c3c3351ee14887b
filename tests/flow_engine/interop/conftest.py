"""Fixtures of the LangFlow import/export tests: an engine app built by ``create_app`` exactly
as production builds it (SQLite under ``tmp_path``, the named keys of every role, the session's
real llm-sim as its OpenAI endpoint; its own registry, routes and roles, nothing added), and
LangFlow-shaped fixtures from examples/langflow/."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry
from support.keys import KEYS, as_

from flow_engine.api import knowledge as knowledge_api
from flow_engine.app import create_app
from flow_engine.metrics import EngineMetrics

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "langflow"


class ClosingClient(FlaskClient):
    """Reads each response to its end (runs are recorded when the response closes)."""

    def open(self, *args: Any, buffered: bool = True, **kwargs: Any) -> Any:
        return super().open(*args, buffered=buffered, **kwargs)


@pytest.fixture
def make_engine(tmp_path: Path, fresh_llm_sim: Any) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        config = {"database_url": f"sqlite:///{tmp_path / 'engine.db'}", "api_keys": KEYS,
                  "maintenance_interval_s": 0, "rollout_interval_s": 0,
                  "openai_base_url": fresh_llm_sim.base_url,
                  **config}
        app = create_app(config, metrics=EngineMetrics(CollectorRegistry()))
        app.test_client_class = ClosingClient
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions[knowledge_api.EXTENSION].close()
        eng = app.extensions["flowgate"]
        eng.maintenance.stop()
        eng.runs.executor.close()
        eng.store.close()


@pytest.fixture
def engine_client(make_engine: Callable[..., Flask]) -> FlaskClient:
    return make_engine().test_client()


@pytest.fixture
def example() -> Callable[[str], dict[str, Any]]:
    """A LangFlow export from examples/langflow/ (written for these tests in LangFlow's shape)."""

    def load(name: str) -> dict[str, Any]:
        return json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))

    return load


@pytest.fixture
def import_flow(engine_client: FlaskClient) -> Callable[..., Any]:
    """POST /api/v1/flows/import as ``who`` (a role's key); the response."""

    def send(export: Any, who: str = "editor", **fields: Any) -> Any:
        return engine_client.post("/api/v1/flows/import", headers=as_(who),
                                  json={"format": "langflow", "flow": export, **fields})

    return send
