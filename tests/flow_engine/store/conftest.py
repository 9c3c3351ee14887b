"""Store fixtures: every test gets an empty, migrated database on each backend.

SQLite lives in a file under ``tmp_path``. PostgreSQL gets a uniquely named schema per test
(the connection's ``search_path`` points at it) that is dropped with CASCADE afterwards, so
tests are isolated from each other and from earlier runs. When PostgreSQL is unreachable the
``postgres`` cases skip, except under CI (``CI`` set), where they fail: a CI run that silently
tested one backend would look green while testing half of the store.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from flow_engine.store import SqlFlowStore

POSTGRES_URL = os.environ.get("FLOWGATE_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[psycopg.Connection]:
    """An autocommit connection for creating and dropping test schemas."""
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        reason = (f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc.__class__.__name__}: "
                  f"{str(exc).strip()}); start it or set FLOWGATE_TEST_POSTGRES_URL")
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so the postgres backend must run)", pytrace=False)
        pytest.skip(reason)
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


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres")])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, not yet migrated database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flows.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def open_store(db_url: str) -> Iterator[Callable[..., SqlFlowStore]]:
    """Open extra stores (default: on this test's database); all are closed after the test."""
    opened: list[SqlFlowStore] = []

    def open_(url: str = db_url, **options: Any) -> SqlFlowStore:
        store = SqlFlowStore(url, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[..., SqlFlowStore]) -> SqlFlowStore:
    """A migrated SqlFlowStore on an empty database, once per backend (ids sqlite, postgres)."""
    store = open_store()
    store.migrate()
    return store
