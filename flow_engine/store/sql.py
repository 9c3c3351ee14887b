"""FlowStore on SQLAlchemy Core: SQLite by default, PostgreSQL when ``DATABASE_URL`` says so.

Writes that read before they write (publish, rollback, new version) run in one transaction
that holds the flow's row lock (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE``
on SQLite), so two concurrent publishes serialise and the live pointer only ever names a
version that exists. A crash mid-write rolls the transaction back: the old state stays.

The schema is created or migrated on start-up (``migrate()``), guarded by a lock so that
several workers starting at once do not race.

Run records and chat messages are an operational log written on every run, so on PostgreSQL
they go through a second connection pool whose sessions commit with
``synchronous_commit=off``: the commit does not wait for the WAL flush (about 1 ms here), a
constraint still holds at once (an idempotency key is claimed atomically), and only a crash of
the database server itself can lose the last few hundred milliseconds of them. Flows and
versions always commit synchronously. On SQLite, a run's claim and end (``_log_write``) go
straight to the driver instead, with SQLAlchemy's own value conversions (engines.py,
``DriverWrites``): its transaction cost more than the write.

Around it: ``store/schema.py`` (tables, migrations), ``store/engines.py`` (pools, their sizes,
transactions, a connection that died while idle replaced without failing its caller) and
``store/upkeep.py`` (what the maintenance job asks: orphaned runs, retention, job claims).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from flow_engine.errors import Conflict, FlowNotFound, RunNotFound
from flow_engine.store.base import ChatMessage, RunRecord, StoreError
from flow_engine.store.engines import (
    Checkpoints,
    DriverWrites,
    PoolSize,
    on_write_commit,
    postgres_engine,
    postgres_transaction,
    sqlite_engine,
    sqlite_transaction,
)
from flow_engine.store.flow_tables import FlowTables
from flow_engine.store.outcome_tables import OutcomeTables
from flow_engine.store.schema import FINISH_RUN as _FINISH_RUN
from flow_engine.store.schema import INSERT_RUN as _INSERT_RUN
from flow_engine.store.schema import (
    MIGRATIONS,
    TS,
    aware,
    chat_messages,
    flows,
    normalise_url,
    now,
    runs,
    schema_version,
)
from flow_engine.store.upkeep import Upkeep

__all__ = ["MIGRATIONS", "PING_IDLE_S", "TS", "PoolSize", "SqlFlowStore", "normalise_url", "now",
           "runs", "schema_version"]
log = logging.getLogger(__name__)
PING_IDLE_S = 2.0  # a pooled PostgreSQL connection idle longer than this is pinged before use
_VANISHED = object()  # insert_run: the idempotency key's holder disappeared mid-insert
_aware = aware
# claim_runs: a run's record unless its run id or idempotency key is taken; on SQLite one
# record per execution (in key order), on PostgreSQL all of them, returning those inserted
_CLAIM_RUN = sqlite_insert(runs).on_conflict_do_nothing()
_CLAIM_RUNS = postgresql_insert(runs).on_conflict_do_nothing().returning(runs.c.run_id)


class SqlFlowStore(FlowTables, OutcomeTables, Upkeep):
    """The one FlowStore implementation (see the module docstring)."""

    def __init__(self, url: str, *, echo: bool = False,
                 on_error: Callable[[str], None] | None = None,
                 on_reconnect: Callable[[str], None] | None = None,
                 on_audit: Callable[[Any], None] | None = None,
                 lock_timeout_s: float = 30.0, pool: PoolSize | None = None) -> None:
        self.url = normalise_url(url)
        self.lock_timeout_s = lock_timeout_s
        self.is_sqlite = self.url.startswith("sqlite")
        self._on_error = on_error
        self._on_reconnect = on_reconnect or (lambda op: None)
        self._on_audit = on_audit or (lambda entry: None)  # each committed change
        self._driver: DriverWrites | None = None
        self._checkpoints: Checkpoints | None = None
        if self.is_sqlite:
            self.engine = self.log_engine = sqlite_engine(self.url, echo=echo,
                                                          lock_timeout_s=lock_timeout_s)
            self._driver = DriverWrites(self.engine)  # ``echo`` does not show its statements
            self._checkpoints = Checkpoints.for_engine(self.engine)
            on_write_commit(self.engine, self._committed)
            return
        pool = pool or PoolSize()
        self.engine = postgres_engine(self.url, pool, echo=echo, ping_idle_s=PING_IDLE_S)
        # run records and chat messages (see the module docstring)
        self.log_engine = postgres_engine(self.url, pool, echo=echo, ping_idle_s=PING_IDLE_S,
                                          synchronous_commit=False)

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _write(self, *, log: bool = False) -> Iterator[Any]:
        """A write transaction; ``log``: a run record or chat message (see the docstring)."""
        with self._guard("write"), self._transaction(self.log_engine if log else self.engine,
                                                     "write") as conn:
            yield conn

    @contextmanager
    def _log_write(self) -> Iterator[Any]:
        """A run's claim or end: ``_write(log=True)``, or on SQLite a driver transaction
        (see the docstring), whose ``execute`` takes only statements built once
        (``_INSERT_RUN``, ``_FINISH_RUN``, ``_CLAIM_RUN``)."""
        if self._driver is None:
            with self._write(log=True) as conn:
                yield conn
            return
        with self._guard("write"), self._driver.transaction(self.lock_timeout_s) as conn:
            yield conn
        self._committed()

    def _committed(self) -> None:
        """SQLite: a write transaction committed (here or through SQLAlchemy, the knowledge
        store's too), one more towards the next background checkpoint."""
        if self._checkpoints is not None:
            self._checkpoints.committed()

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._guard("read"), self._transaction(self.engine, "read") as conn:
            yield conn

    def _transaction(self, engine: sa.Engine, op: str):
        if self.is_sqlite:
            return sqlite_transaction(engine, write=op == "write",
                                      lock_timeout_s=self.lock_timeout_s)
        return postgres_transaction(engine, lambda: self._on_reconnect(op))

    @contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        try:
            yield
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            if self._on_error:
                self._on_error(op)
            log.error("store %s failed: %s", op, exc.__class__.__name__,
                      extra={"error": str(exc.orig) if hasattr(exc, "orig") else str(exc)})
            raise StoreError("the flow store is unavailable; retry shortly") from exc

    def _lock_flow(self, conn: Any, flow_id: str) -> sa.Row:
        query = sa.select(flows).where(flows.c.id == flow_id)
        if not self.is_sqlite:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise FlowNotFound(f"no flow '{flow_id}'")
        return row

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the schema version now in force."""
        # The advisory lock (PostgreSQL) and BEGIN IMMEDIATE (SQLite) serialise concurrent
        # starters; a duplicate-object race on first creation is retried, nothing else.
        for attempt in range(5):
            try:
                return self._migrate_once()
            except IntegrityError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        return len(MIGRATIONS)

    def _migrate_once(self) -> int:
        with self._write() as conn:
            if not self.is_sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(727272)"))
            conn = getattr(conn, "sa_connection", conn)  # DDL and inspection need the real one
            schema_version.create(conn, checkfirst=True)
            current = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(schema_version.c.version), 0))
            ).scalar_one()
            for target in range(current, len(MIGRATIONS)):
                MIGRATIONS[target](conn)
                conn.execute(schema_version.insert().values(version=target + 1, applied_at=now()))
            return len(MIGRATIONS)

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        if self.log_engine is not self.engine:
            self.log_engine.dispose()
        self.engine.dispose()

    # -- runs ------------------------------------------------------------------------------------

    def insert_run(self, record: RunRecord) -> RunRecord | None:
        existing = self._insert_run_once(record)
        if existing is _VANISHED:  # the key's holder expired and was deleted: once more
            existing = self._insert_run_once(record)
        if existing is _VANISHED:
            raise Conflict(f"run id '{record.run_id}' already exists")
        return existing

    def _insert_run_once(self, record: RunRecord):
        try:
            with self._log_write() as conn:
                conn.execute(_INSERT_RUN, _run_values(record))
        except IntegrityError:
            existing = (self.find_run_by_key(record.idempotency_key)
                        if record.idempotency_key is not None else None)
            if existing is not None:
                return existing
            if record.idempotency_key is not None and self._run_exists(record.run_id) is False:
                return _VANISHED
            raise Conflict(f"run id '{record.run_id}' already exists") from None
        return None

    def claim_runs(self, records: list[RunRecord]) -> set[str]:
        """Insert keyed runs' records in one transaction, skipping each whose run id or
        idempotency key is taken (``insert_run`` then tells why); the run ids inserted. In
        key order: two processes' batches sharing two keys never wait for each other in
        opposite orders (a PostgreSQL deadlock)."""
        ordered = sorted(records, key=lambda r: (r.idempotency_key or "", r.run_id))
        with self._log_write() as conn:
            if self.is_sqlite:
                return {r.run_id for r in ordered
                        if conn.execute(_CLAIM_RUN, _run_values(r)).rowcount == 1}
            done = conn.execute(_CLAIM_RUNS, [_run_values(r) for r in ordered])
            return set(done.scalars().all())

    def _run_exists(self, run_id: str) -> bool:
        with self._read() as conn:
            return conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id == run_id)).first() is not None

    def finish_run(self, run_id: str, *, status: str, duration_ms: float,
                   result: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        with self._log_write() as conn:
            conn.execute(_FINISH_RUN, {"key_run_id": run_id, "status": status,
                                       "duration_ms": duration_ms, "result": result,
                                       "error": error, "finished_at": now()})

    def record_run_ends(self, inserts: list[RunRecord], finishes: list[dict[str, Any]]) -> None:
        """Many runs' ends in one transaction: ``inserts`` are whole records of unkeyed runs,
        ``finishes`` the ends (``run_id``, ``status``, ``duration_ms``, ``result``,
        ``error``) of keyed runs whose claim is stored. All or nothing: on any error nothing
        is written (runs/record_writer.py then writes them one by one)."""
        with self._log_write() as conn:
            if inserts:
                conn.execute(_INSERT_RUN, [_run_values(r) for r in inserts])
            if finishes:
                at = now()
                conn.execute(_FINISH_RUN, [{"key_run_id": f["run_id"], "status": f["status"],
                                            "duration_ms": f["duration_ms"], "result": f["result"],
                                            "error": f["error"], "finished_at": at}
                                           for f in finishes])

    def heartbeat(self, run_ids: list[str]) -> None:
        """Mark these running runs as alive now (one statement for all of them)."""
        if not run_ids:
            return
        with self._write(log=True) as conn:
            conn.execute(runs.update().where(runs.c.run_id.in_(run_ids),
                                             runs.c.status == "running")
                         .values(heartbeat_at=now()))

    def abandon_run(self, run_id: str, heartbeat_at: datetime, error: dict[str, Any]) -> bool:
        """Mark a running run whose owner stopped heartbeating as failed and free its
        idempotency key; False when it moved on meanwhile (it finished, or its owner — or
        another process abandoning it — wrote first)."""
        with self._write(log=True) as conn:
            done = conn.execute(runs.update().where(
                runs.c.run_id == run_id, runs.c.status == "running",
                runs.c.heartbeat_at == heartbeat_at,
            ).values(status="failed", error=error, finished_at=now(), idempotency_key=None))
        return done.rowcount == 1

    def get_run(self, run_id: str) -> RunRecord:
        with self._read() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).first()
        if row is None:
            raise RunNotFound(f"no run '{run_id}'")
        return _run(row)

    def list_runs(self, *, tenant: str | None, flow_id: str | None, limit: int,
                  before: datetime | None = None) -> list[RunRecord]:
        query = sa.select(runs)
        if tenant is not None:
            query = query.where(runs.c.tenant == tenant)
        if flow_id is not None:
            query = query.where(runs.c.flow_id == flow_id)
        if before is not None:
            query = query.where(runs.c.created_at < before)
        with self._read() as conn:
            rows = conn.execute(query.order_by(runs.c.created_at.desc()).limit(limit))
            return [_run(r) for r in rows]

    def find_run_by_key(self, idempotency_key: str) -> RunRecord | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(runs).where(runs.c.idempotency_key == idempotency_key)).first()
        return _run(row) if row is not None else None

    def delete_run(self, run_id: str) -> None:
        with self._write(log=True) as conn:
            conn.execute(runs.delete().where(runs.c.run_id == run_id))

    # -- chat memory -------------------------------------------------------------------------

    def chat_history(self, tenant: str, session_id: str, flow_id: str,
                     limit: int) -> list[ChatMessage]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(chat_messages.c.role, chat_messages.c.content)
                .where(chat_messages.c.tenant == tenant,
                       chat_messages.c.session_id == session_id,
                       chat_messages.c.flow_id == flow_id)
                .order_by(chat_messages.c.id.desc()).limit(limit)
            ).all()
        return [ChatMessage(r.role, r.content) for r in reversed(rows)]

    def append_chat(self, tenant: str, session_id: str, flow_id: str,
                    messages: list[ChatMessage]) -> None:
        if not messages:
            return
        stamp = now()
        with self._write(log=True) as conn:
            conn.execute(chat_messages.insert(), [
                {"tenant": tenant, "session_id": session_id, "flow_id": flow_id,
                 "role": m.role, "content": m.content, "created_at": stamp} for m in messages])


def _run(row: sa.Row) -> RunRecord:
    return RunRecord(
        run_id=row.run_id, flow_id=row.flow_id, version=row.version, status=row.status,
        created_at=_aware(row.created_at), session_id=row.session_id, trace_id=row.trace_id,
        idempotency_key=row.idempotency_key, request_hash=row.request_hash,
        finished_at=_aware(row.finished_at), duration_ms=row.duration_ms, result=row.result,
        error=row.error, heartbeat_at=_aware(row.heartbeat_at), tenant=row.tenant,
    )


def _run_values(record: RunRecord) -> dict[str, Any]:
    return {
        "run_id": record.run_id, "flow_id": record.flow_id, "version": record.version,
        "status": record.status, "session_id": record.session_id,
        "trace_id": record.trace_id, "idempotency_key": record.idempotency_key,
        "request_hash": record.request_hash, "created_at": record.created_at,
        "finished_at": record.finished_at, "duration_ms": record.duration_ms,
        "result": record.result, "error": record.error, "heartbeat_at": record.heartbeat_at,
        "tenant": record.tenant,
    }
