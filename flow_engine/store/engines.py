"""Connections to the store's database: the engines (pools) and their transactions.

SQLite: WAL, a short busy timeout, and the write lock taken up front (``BEGIN IMMEDIATE``),
waited for cooperatively (a gevent worker must not block in SQLite's busy handler).

PostgreSQL: two bounded pools per process (flows; run records and chat messages, whose
sessions commit with ``synchronous_commit=off``), sized by ``FLOW_ENGINE_DB_POOL_SIZE`` and
``FLOW_ENGINE_DB_MAX_OVERFLOW``: a process opens at most ``2 * (pool_size + max_overflow)``
connections, so ``replicas * workers * 2 * (pool_size + max_overflow)`` must stay below the
server's ``max_connections`` (100 by default) minus what else connects. A connection can die
while it sits in the pool (a database restart, ``pg_terminate_backend``, a proxy's idle
timeout). One idle longer than ``PING_IDLE_S`` is pinged before use; one that fails its
first statement anyway is replaced and that statement run again, once (:class:`FirstUse`).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from flowgate.common.backoff import Backoff

T = TypeVar("T")


@dataclass(frozen=True)
class PoolSize:
    """One PostgreSQL pool: connections kept, extra ones under load, and how long a request
    waits for one before the store answers 503."""

    size: int = 5
    overflow: int = 5
    timeout_s: float = 10.0


def postgres_engine(url: str, pool: PoolSize, *, echo: bool, ping_idle_s: float,
                    synchronous_commit: bool = True) -> Engine:
    engine = sa.create_engine(url, echo=echo, pool_size=max(1, pool.size),
                              max_overflow=pool.overflow, pool_timeout=pool.timeout_s,
                              pool_recycle=1800)
    ping_when_idle(engine, ping_idle_s)
    if not synchronous_commit:
        @sa.event.listens_for(engine, "connect")
        def _async_commit(dbapi_conn, _record) -> None:
            with dbapi_conn.cursor() as cursor:
                cursor.execute("SET synchronous_commit TO off")
            dbapi_conn.commit()
    return engine


def sqlite_engine(url: str, *, echo: bool, lock_timeout_s: float) -> Engine:
    engine = sa.create_engine(
        url, echo=echo,
        connect_args={"check_same_thread": False, "timeout": 0.002, "isolation_level": None},
    )

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # WAL: readers never block the writer
        cursor = dbapi_conn.cursor()
        # A short busy timeout: SQLite's own busy wait blocks the whole gevent worker, so
        # waiting for locks happens here and in begin_sqlite, cooperatively.
        cursor.execute("PRAGMA busy_timeout=2")
        retry_locked(lambda: cursor.execute("PRAGMA journal_mode=WAL"), lock_timeout_s)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):  # take the write lock up front so read-then-write never deadlocks
        mode = "IMMEDIATE" if conn.get_execution_options().get("flowgate_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


@contextmanager
def sqlite_transaction(engine: Engine, *, write: bool, lock_timeout_s: float
                       ) -> Iterator[Connection]:
    with engine.connect() as conn:
        if write:
            conn = conn.execution_options(flowgate_write=True)

        def begin():
            try:
                return conn.begin()
            except OperationalError:
                if conn.in_transaction():
                    conn.rollback()
                raise

        with retry_locked(begin, lock_timeout_s) if write else conn.begin():
            yield conn


@contextmanager
def postgres_transaction(engine: Engine, on_retry: Callable[[], None]) -> Iterator[FirstUse]:
    """A transaction (begun by the first statement, committed at the end) on a connection
    whose first statement is retried once if the connection turns out dead (FirstUse)."""
    with engine.connect() as conn:
        first_use = FirstUse(conn, on_retry)
        try:
            yield first_use
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise


class FirstUse:
    """The connection a store method gets on PostgreSQL. Its first statement, if it fails
    because the pooled connection was dead (SQLAlchemy invalidates it: a disconnect), is run
    again, once, on a fresh connection. That is safe for writes too: nothing of this
    transaction can have taken effect — the statement either never reached a live server or
    ran in a transaction that died uncommitted with its connection. A disconnect after a
    statement succeeded is not retried: the transaction's earlier work is gone, and only the
    caller knows whether to run it all again."""

    __slots__ = ("_conn", "_on_retry", "_used")

    def __init__(self, conn: Connection, on_retry: Callable[[], None]) -> None:
        self._conn, self._on_retry, self._used = conn, on_retry, False

    @property
    def sa_connection(self) -> Connection:
        """The SQLAlchemy connection itself (schema inspection, DDL)."""
        return self._conn

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self._used:
            return self._conn.execute(*args, **kwargs)
        try:
            result = self._conn.execute(*args, **kwargs)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            self._conn.rollback()  # forget the dead connection's transaction: reconnect
            self._on_retry()
            result = self._conn.execute(*args, **kwargs)
        self._used = True
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Like ``pool_pre_ping``, but only for connections idle longer than ``idle_s``: a ping is
    a round trip (0.15 ms here) that a connection in steady use does not need, while one that
    sat idle may have been closed by a database restart or a proxy. A failed ping makes the
    pool open a new connection instead."""

    @sa.event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn, record) -> None:
        record.info["flowgate_idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy) -> None:
        since = record.info.get("flowgate_idle_since")
        if since is None or time.monotonic() - since <= idle_s:
            return
        try:
            with dbapi_conn.cursor() as cursor:
                cursor.execute("SELECT 1")
        except Exception as exc:  # any failure: the connection is not usable
            raise sa.exc.DisconnectionError(str(exc)) from exc
        finally:
            with contextlib.suppress(Exception):
                dbapi_conn.rollback()  # end the ping's implicit transaction


def retry_locked(action: Callable[[], T], timeout_s: float) -> T:
    """Run ``action`` until SQLite stops answering "database is locked" (bounded), sleeping
    in between with time.sleep, which gevent makes cooperative."""
    deadline = time.monotonic() + timeout_s
    delays = Backoff(0.0005, 0.02).delays()
    while True:
        try:
            return action()
        except (OperationalError, sqlite3.OperationalError) as exc:
            message = str(getattr(exc, "orig", exc))
            if ("locked" not in message and "busy" not in message) or time.monotonic() > deadline:
                raise
        time.sleep(next(delays))
