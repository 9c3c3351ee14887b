"""Store fixtures: every test gets an empty, migrated database on each backend.

SQLite lives in a file under ``tmp_path``. PostgreSQL gets a uniquely named schema per test
(the connection's ``search_path`` points at it) that is dropped with CASCADE afterwards, so
tests are isolated from each other and from earlier runs. When PostgreSQL is unreachable the
``postgres`` cases skip, except under CI (``CI`` set), where they fail: a CI run that silently
tested one backend would look green while testing half of the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flow_engine.store import SqlFlowStore


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
