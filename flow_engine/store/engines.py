"""Connections to the store's database: the engines (pools) and their transactions.

SQLite: WAL, a short busy timeout, and the write lock taken up front (``BEGIN IMMEDIATE``),
waited for cooperatively (a gevent worker must not block in SQLite's busy handler). The
hottest writes (run claims and ends) skip SQLAlchemy's per-transaction work and go straight
to the driver (:class:`DriverWrites`), and the WAL is checkpointed in an operating-system
thread (:class:`Checkpoints`) rather than by whichever commit crossed the threshold.

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
import logging
import os
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from flowgate.common.backoff import Backoff

T = TypeVar("T")
log = logging.getLogger(__name__)
CHECKPOINT_EVERY = 100  # write transactions of a process between its background checkpoints
# A commit checkpoints itself only past this many WAL pages (SQLite's default is 1000): a
# backstop for when background checkpoints cannot keep up or cannot run
WAL_AUTOCHECKPOINT = 10000


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
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT}")
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


class Prepared:
    """A statement compiled once for the sqlite3 driver, with the conversion SQLAlchemy
    applies to each of its parameters (the processor of each bind's type on this dialect:
    aware datetimes to SQLite's text, JSON to text, lone surrogates scrubbed). Executed with
    them, it writes what SQLAlchemy would have written, byte for byte, without the
    statement cache lookup, parameter machinery and result set-up around each execution.
    The caller supplies every parameter (no literal values in the statement)."""

    __slots__ = ("_binds", "sql")

    def __init__(self, statement: sa.Executable, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._binds = tuple(
            (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in compiled.positiontup or ())

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(values[name] if process is None else process(values[name])
                     for name, process in self._binds)


class DriverWrites:
    """Write transactions straight on a pooled sqlite3 connection, for the store's hottest
    writes (a run's claim and end: several per run). SQLAlchemy's transaction costs more
    than the write itself — about 0.2 ms of CPU per transaction here, in connection set-up,
    events, the ``BEGIN IMMEDIATE`` statement and result handling — while the driver needs
    only BEGIN IMMEDIATE, the statement, COMMIT. What stays the same: the pool's
    connections (and their pragmas), the lock waited for with :func:`retry_locked`, and
    errors raised as SQLAlchemy's own (``DBAPIError.instance``), so that callers tell an
    IntegrityError from an unavailable store as before."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._prepared: dict[sa.Executable, Prepared] = {}

    @contextmanager
    def transaction(self, lock_timeout_s: float) -> Iterator[DriverTransaction]:
        pooled = None
        try:
            pooled = self.engine.raw_connection()
            conn = pooled.driver_connection
            retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"), lock_timeout_s)
            try:
                yield DriverTransaction(conn, self.prepared)
                conn.commit()
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        except sqlite3.Error as exc:
            gone = self.engine.dialect.is_disconnect(exc, pooled, None)
            if gone and pooled is not None:
                pooled.invalidate(exc)
            raise DBAPIError.instance(None, None, exc, sqlite3.Error,
                                      connection_invalidated=gone) from exc
        finally:
            if pooled is not None:
                pooled.close()

    def prepared(self, statement: sa.Executable) -> Prepared:
        try:
            return self._prepared[statement]
        except KeyError:
            prepared = self._prepared[statement] = Prepared(statement, self.engine.dialect)
            return prepared


class DriverTransaction:
    """What ``DriverWrites.transaction`` yields: ``execute(statement, parameters)`` as on a
    SQLAlchemy connection, for statements built once (each is compiled on first use and
    kept); a list of parameter dicts runs it once per dict. Returns the sqlite3 cursor."""

    __slots__ = ("_conn", "_prepared")

    def __init__(self, conn: sqlite3.Connection, prepared: Callable[[Any], Prepared]) -> None:
        self._conn, self._prepared = conn, prepared

    def execute(self, statement: sa.Executable,
                parameters: Mapping[str, Any] | list[Mapping[str, Any]]) -> sqlite3.Cursor:
        prepared = self._prepared(statement)
        many = isinstance(parameters, list)
        try:
            values = ([prepared.parameters(p) for p in parameters] if many
                      else prepared.parameters(parameters))
        except Exception as exc:  # a value its column cannot take: said as SQLAlchemy says it
            raise sa.exc.StatementError(str(exc), prepared.sql, None, exc) from exc
        if many:
            return self._conn.executemany(prepared.sql, values)
        return self._conn.execute(prepared.sql, values)


class Checkpoints:
    """Background WAL checkpoints for one SQLite file. SQLite copies the WAL back into the
    database (a checkpoint: page writes and two fsyncs, several ms) in the commit that finds
    the WAL past ``wal_autocheckpoint`` pages; in a gevent worker that stalls every request
    of the process meanwhile, and it added ~65 µs of wall time to each commit on average
    here. Instead, every ``every``-th write transaction of this process (``committed``)
    starts a PASSIVE checkpoint in an operating-system thread (:func:`run_in_os_thread`),
    one at a time, on a connection of its own. PASSIVE never waits: readers and writers — of any process —
    go on meanwhile, and a checkpoint that meets another one or a reader still using the
    WAL's start copies what it can (SQLite's own auto-checkpoints are PASSIVE too). Commits
    still checkpoint past ``WAL_AUTOCHECKPOINT`` pages, should these fall behind — and under
    writes without a pause they do: SQLite starts the WAL over only once a checkpoint has
    copied all of it, which one running alongside new commits rarely has, so the WAL grows
    to that size (40 MB) and a commit's checkpoint, small by then, completes it."""

    def __init__(self, path: str, *, uri: bool = False, every: int = CHECKPOINT_EVERY) -> None:
        self.path, self.uri, self.every = path, uri, every
        self._commits = 0
        self._running = False
        self.failure: BaseException | None = None  # the last one's, told at the next start

    @classmethod
    def for_engine(cls, engine: Engine) -> Checkpoints | None:
        """The file the engine's connections open (as they open it); None for an in-memory
        database (no WAL)."""
        args, options = engine.dialect.create_connect_args(engine.url)
        path, uri = args[0], bool(options.get("uri"))
        if path == ":memory:" or (uri and "mode=memory" in path):
            return None
        return cls(path, uri=uri)

    def committed(self) -> None:
        self._commits += 1
        if self._commits % self.every or self._running:
            return
        if self.failure is not None:
            log.warning("sqlite checkpoint failed: %s", self.failure)
            self.failure = None
        self._running = True
        try:
            run_in_os_thread(self.checkpoint, "flowgate-sqlite-checkpoint")
        except Exception as exc:  # no thread to be had: commits checkpoint themselves
            self._running = False
            log.warning("sqlite checkpoint not started: %s", exc)

    def _existing(self) -> str:
        """The file as a URI that opens it only if it exists (a checkpoint after the file
        was deleted must not create an empty database)."""
        if not self.uri:
            return f"file:{urllib.parse.quote(self.path)}?mode=rw"
        return self.path + ("&" if "?" in self.path else "?") + "mode=rw"

    def checkpoint(self) -> None:
        """One PASSIVE checkpoint (in the OS thread: nothing here may log or switch)."""
        try:
            conn = sqlite3.connect(self._existing(), timeout=0, isolation_level=None, uri=True)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
        except Exception as exc:
            self.failure = exc
        finally:
            self._running = False


def on_write_commit(engine: Engine, action: Callable[[], None]) -> None:
    """Call ``action`` as each write transaction on ``engine`` commits: those that take the
    write lock up front (``flowgate_write``: the store's, the knowledge store's)."""

    @sa.event.listens_for(engine, "commit")
    def _commit(conn: Connection) -> None:
        if conn.get_execution_options().get("flowgate_write"):
            action()


_pool: tuple[int, Any] | None = None  # (pid, a gevent ThreadPool of this process's own)


def run_in_os_thread(action: Callable[[], None], name: str) -> None:
    """Start ``action`` in an operating-system thread; do not wait for it. In a gevent
    worker, ``threading`` is monkey-patched and its threads are greenlets of the worker's
    one thread, where a blocking call stalls every request: a gevent ThreadPool has real
    ones. A pool of its own, not the hub's: the hub's also resolves host names, and a spawn
    on a full pool waits — in a commit, holding the database's write lock."""
    global _pool
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        if _pool is None or _pool[0] != os.getpid():  # (a forked worker makes its own)
            from gevent.threadpool import ThreadPool

            _pool = (os.getpid(), ThreadPool(2))
        _pool[1].spawn(action)
    else:
        threading.Thread(target=action, name=name, daemon=True).start()


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
