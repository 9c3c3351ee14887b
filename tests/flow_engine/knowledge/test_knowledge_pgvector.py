"""PostgreSQL with pgvector in detail: the migration creates the extension itself, each base
gets its own HNSW cosine index, and the search the service really runs is answered from it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from kb_harness import (
    FakeSleep,
    close_app,
    create_base,
    engine_app,
    knowledge_service,
    upload_text,
    wait_document,
)
from psycopg import sql
from support.embedded_pg import EmbeddedPostgres
from support.keys import as_

from flow_engine.knowledge import schema
from flow_engine.knowledge.model import SearchRequest


@pytest.fixture
def database_without_vector(vector_pg: EmbeddedPostgres) -> Iterator[str]:
    """A new database on the pgvector server: the extension is installed, not yet created."""
    name = f"kb_fresh_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(vector_pg.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield vector_pg.url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(vector_pg.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_ensure_creates_the_vector_extension_where_it_is_not_yet_created(database_without_vector) -> None:
    engine = sa.create_engine(database_without_vector.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT to_regtype('vector')")).scalar() is None
            assert schema.problem(conn) == schema.MISSING_VECTOR
        with engine.begin() as conn:
            assert schema.ensure(conn) is None
        with engine.connect() as conn:
            assert conn.execute(sa.text(
                "SELECT extname FROM pg_extension WHERE extname = 'vector'")).scalar() == "vector"
            assert schema.problem(conn) is None
    finally:
        engine.dispose()


def _chunks_indexes(conn: sa.Connection) -> dict[str, str]:
    return dict(conn.execute(sa.text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'knowledge_chunks' "
        "AND schemaname = ANY (current_schemas(false))")).all())


def test_each_base_has_its_own_hnsw_index_and_the_search_uses_it(vector_pg_url, llm_sim) -> None:
    app = engine_app(vector_pg_url, llm_sim.base_url, sleep=FakeSleep())
    try:
        api = app.test_client()
        service = knowledge_service(app)
        for kb_id in ("handbook", "runbooks"):
            create_base(api, kb_id)
            doc = upload_text(api, kb_id, "refunds.md", "Refunds are issued within five days.")
            assert wait_document(api, kb_id, doc["id"])["status"] == "ready"
        with service.store.read() as conn:
            indexes = _chunks_indexes(conn)
        for kb_id in ("handbook", "runbooks"):
            definition = indexes[schema.index_name(kb_id)]
            assert "USING hnsw" in definition and "vector_cosine_ops" in definition, definition
            assert f"kb_id)::text = '{kb_id}'" in definition, definition
        statements: list[tuple[str, Any]] = []

        def record(_conn, _cursor, statement, parameters, _context, _many) -> None:
            statements.append((statement, parameters))

        engine = service.store.engine
        sa.event.listen(engine, "before_cursor_execute", record)
        try:
            service.search("handbook", SearchRequest("refunds", 3, "vector"))
        finally:
            sa.event.remove(engine, "before_cursor_execute", record)
        settings = [s for s in statements if "set_config" in s[0]]
        [(query, params)] = [s for s in statements if "ORDER BY" in s[0] and "<=>" in s[0]]
        with engine.begin() as conn:  # the same statements, explained (seq scans priced out:
            for statement, parameters in settings:  # on a few rows a scan is cheaper)
                conn.exec_driver_sql(statement, parameters)
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + query, params))
        assert schema.index_name("handbook") in plan, plan
        assert schema.index_name("runbooks") not in plan, plan
        assert api.delete("/api/v1/knowledge/runbooks", headers=as_("admin")).status_code == 204
        with service.store.read() as conn:
            indexes = _chunks_indexes(conn)
        assert schema.index_name("runbooks") not in indexes and schema.index_name("handbook") in indexes
    finally:
        close_app(app)


@pytest.mark.parametrize(("version", "too_old"), [
    ("0.7.4", True), ("0.5.1", True), ("0.8.0", False), ("0.8.6", False), ("0.10.1", False),
    ("1.0.0", False), (None, False)])
def test_pgvector_older_than_0_8_is_refused_with_the_reason(version, too_old) -> None:
    reason = schema.pgvector_problem(version)
    assert (reason is not None) == too_old
    if too_old:
        assert f"version {version}" in reason and "0.8 or later" in reason


def test_the_server_s_pgvector_is_recent_enough(vector_pg_url) -> None:
    engine = sa.create_engine(vector_pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            assert schema.ensure(conn) is None
            version = conn.execute(sa.text(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
            assert schema.pgvector_problem(version) is None and schema.problem(conn) is None
    finally:
        engine.dispose()
