"""The store's schema: tables, column types, and the migrations that bring any earlier
schema up to date (``SqlFlowStore.migrate``). Migrations are appended, never edited.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flow_engine import jsontext

metadata = sa.MetaData()


class UTCDateTime(sa.TypeDecorator):
    """Timestamps go in and come out as aware UTC, whatever the backend or session zone
    (SQLite keeps no zone; PostgreSQL answers in the session's TimeZone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return _utc(value)

    def process_result_value(self, value, dialect):
        return _utc(value)


TS = UTCDateTime()


class Text(sa.TypeDecorator):
    """A text column whose values never hold a lone surrogate (flow_engine/jsontext.py):
    the driver cannot encode one, so a session id or chat message from a client's JSON
    would fail its write (and a flow or run id from a WebSocket message its lookup). Each
    becomes U+FFFD, in writes and in lookups alike."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return jsontext.scrub(value) if isinstance(value, str) else value


class String(Text):
    impl = sa.String
    cache_ok = True

flows = sa.Table(
    "flows", metadata,
    sa.Column("id", String(64), primary_key=True),
    sa.Column("name", String(200), nullable=False, unique=True),
    sa.Column("description", Text, nullable=False, default=""),
    sa.Column("latest_version", sa.Integer, nullable=False),
    sa.Column("live_version", sa.Integer, nullable=True),
    sa.Column("live_history", sa.JSON, nullable=False),
    sa.Column("routing", sa.JSON, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)
flow_versions = sa.Table(
    "flow_versions", metadata,
    sa.Column("flow_id", String(64), sa.ForeignKey("flows.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("definition", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)
runs = sa.Table(
    "runs", metadata,
    sa.Column("run_id", String(64), primary_key=True),
    sa.Column("flow_id", String(64), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("status", String(16), nullable=False),
    sa.Column("session_id", String(200), nullable=True),
    sa.Column("trace_id", String(64), nullable=True),
    sa.Column("idempotency_key", String(300), nullable=True, unique=True),
    sa.Column("request_hash", String(64), nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("finished_at", TS, nullable=True),
    sa.Column("duration_ms", sa.Float, nullable=True),
    sa.Column("result", sa.JSON, nullable=True),
    sa.Column("error", sa.JSON, nullable=True),
    # a running keyed run's owner refreshes this; a stale one means its engine stopped
    sa.Column("heartbeat_at", TS, nullable=True),
    sa.Column("tenant", String(200), nullable=True),  # who may see it (flow_engine/auth.py)
    sa.Index("ix_runs_created_at", "created_at"),  # retention deletes by age
    sa.Index("ix_runs_running", "status", "heartbeat_at"),  # the reaper finds the running
    # the runs list (GET /runs): a tenant's newest, optionally of one flow
    sa.Index("ix_runs_tenant_created", "tenant", "created_at"),
    sa.Index("ix_runs_tenant_flow_created", "tenant", "flow_id", "created_at"),
)
chat_messages = sa.Table(
    "chat_messages", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", String(200), nullable=False),
    sa.Column("flow_id", String(64), nullable=False),
    sa.Column("role", String(16), nullable=False),
    sa.Column("content", Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    # one conversation per (tenant, session, flow): the same session id in two tenants is
    # two conversations; rows from before tenants (NULL) are never read
    sa.Column("tenant", String(200), nullable=True),
    sa.Index("ix_chat_tenant_session", "tenant", "session_id", "flow_id", "id"),
    sa.Index("ix_chat_created_at", "created_at"),  # retention deletes by age
)
# when each periodic job (flow_engine/maintenance.py) last ran: one process claims a run
jobs = sa.Table(
    "flowgate_jobs", metadata,
    sa.Column("name", String(64), primary_key=True),
    sa.Column("last_run_at", TS, nullable=False),
)
# Run outcomes per flow version and 5-second slot, summed over every engine process: canary
# analysis reads them when the engine has no Redis (flow_engine/rollouts/outcomes.py)
OUTCOME_BUCKETS = 64  # len(flow_engine.rollouts.analysis.BUCKETS)
run_outcome_slots = sa.Table(
    "run_outcome_slots", metadata,
    sa.Column("flow_id", String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("slot", sa.BigInteger, primary_key=True),
    sa.Column("ok", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    *(sa.Column(f"h{i}", sa.Integer, nullable=False) for i in range(OUTCOME_BUCKETS)),
    sa.Index("ix_run_outcome_slots_slot", "slot"),  # retention deletes by age
)
# The same with 12 coarse buckets (2–3× apart), as migration 7 made it. Engines of that
# layout read and write it; this engine never does (migration 9 made run_outcome_slots
# beside it, under a new name, so an old engine still running in a rolling upgrade never
# reads the new buckets with the old meaning). Frozen: only migration 7 uses it.
LEGACY_OUTCOME_BUCKETS = 12
legacy_run_outcomes = sa.Table(
    "run_outcomes", metadata,
    sa.Column("flow_id", String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("slot", sa.BigInteger, primary_key=True),
    sa.Column("ok", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    *(sa.Column(f"h{i}", sa.Integer, nullable=False) for i in range(LEGACY_OUTCOME_BUCKETS)),
    sa.Index("ix_run_outcomes_slot", "slot"),
)
# Every change to a flow, written in the transaction of the change (flow_engine/store/audit.py)
audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", TS, nullable=False),
    sa.Column("actor", String(300), nullable=False),
    sa.Column("action", String(32), nullable=False),
    sa.Column("flow_id", String(64), nullable=False),
    sa.Column("from_version", sa.Integer, nullable=True),
    sa.Column("to_version", sa.Integer, nullable=True),
    sa.Column("routing", sa.JSON, nullable=True),
    sa.Column("reason", sa.JSON, nullable=True),
    sa.Column("message", Text, nullable=True),
    sa.Column("trace_id", String(64), nullable=True),
    sa.Index("ix_audit_flow_seq", "flow_id", "seq"),
)
schema_version = sa.Table(
    "flowgate_schema", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", TS, nullable=False),
)

# statements built once (SQLite's DriverWrites compiles each once): a run's whole record,
# and a run's end (status, result, ...) by run id. DriverWrites takes every value from the
# caller (sql.py _run_values): a new column of runs needs its value there, not a default=
INSERT_RUN = runs.insert()
FINISH_RUN = runs.update().where(runs.c.run_id == sa.bindparam("key_run_id")).values(
    status=sa.bindparam("status"), duration_ms=sa.bindparam("duration_ms"),
    result=sa.bindparam("result"), error=sa.bindparam("error"),
    finished_at=sa.bindparam("finished_at"))

# Each migration brings the schema from version i to i + 1. Append, never edit.
def _add_run_heartbeat(conn: Connection) -> None:
    """runs.heartbeat_at (a schema from before it; a new one already has it)."""
    if "heartbeat_at" not in {c["name"] for c in sa.inspect(conn).get_columns("runs")}:
        conn.execute(sa.text("ALTER TABLE runs ADD COLUMN heartbeat_at "
                             + runs.c.heartbeat_at.type.compile(dialect=conn.dialect)))


def _add_tenants(conn: Connection) -> None:
    """runs.tenant and chat_messages.tenant, and the index chat history is read by."""
    for table in (runs, chat_messages):
        if "tenant" not in {c["name"] for c in sa.inspect(conn).get_columns(table.name)}:
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN tenant "
                                 + table.c.tenant.type.compile(dialect=conn.dialect)))
    for index in chat_messages.indexes:
        if index.name == "ix_chat_tenant_session":
            index.create(conn, checkfirst=True)
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_chat_session"))  # replaced by the one above


def _add_upkeep(conn: Connection) -> None:
    """The jobs table and the indexes the reaper and the retention job read by."""
    jobs.create(conn, checkfirst=True)
    for table, names in ((runs, ("ix_runs_created_at", "ix_runs_running")),
                         (chat_messages, ("ix_chat_created_at",))):
        for index in table.indexes:
            if index.name in names:
                index.create(conn, checkfirst=True)


def _add_knowledge(conn: Connection) -> None:
    """The knowledge tables (flow_engine/knowledge/schema.py): on SQLite always; on
    PostgreSQL with the ``vector`` extension (pgvector) when the server has it. Without it
    nothing is created here; the engine then says so at start (FLOW_ENGINE_KNOWLEDGE=on
    refuses to start) and completes the schema at a later start once pgvector is there."""
    from flow_engine.knowledge import schema as knowledge_schema

    knowledge_schema.ensure(conn)


def _add_audit(conn: Connection) -> None:
    """The audit log (every flow change) and its index by flow."""
    audit_log.create(conn, checkfirst=True)


def _add_outcomes(conn: Connection) -> None:
    """Per-version run outcomes (canary analysis without Redis), 12 buckets: engines since
    migration 9 use run_outcome_slots instead."""
    legacy_run_outcomes.create(conn, checkfirst=True)


def _add_runs_list_indexes(conn: Connection) -> None:
    """The indexes the runs list reads a tenant's newest runs by."""
    for index in runs.indexes:
        if index.name in ("ix_runs_tenant_created", "ix_runs_tenant_flow_created"):
            index.create(conn, checkfirst=True)


def _finer_outcome_buckets(conn: Connection) -> None:
    """run_outcome_slots: run outcomes with the finer duration buckets canary analysis reads
    (64, 1.2× apart; run_outcomes has 12, 2–3× apart), in a table of a NEW name, as the Redis
    keys moved to ``flowgate:outcomes2:``. ``run_outcomes`` is left as it is, rows and all:
    during a rolling upgrade the engines still on the old layout keep reading and writing it
    (and their retention keeps deleting from it), and never see a count of the new buckets
    with the old meaning (h0..h11 of the new layout are all under 65 ms: a slow canary would
    look fast to them). Counts of the old buckets cannot be split into the new ones, so the
    new engines judge from the runs after the upgrade (at most the longest guard window, an
    hour, is not seen). Once no engine of the old layout runs, a later migration may drop
    ``run_outcomes``."""
    run_outcome_slots.create(conn, checkfirst=True)


MIGRATIONS: list[Callable[[Connection], None]] = [
    lambda conn: metadata.create_all(conn, tables=[flows, flow_versions, runs, chat_messages]),
    _add_run_heartbeat,
    _add_tenants,
    _add_upkeep,
    _add_knowledge,
    _add_audit,
    _add_outcomes,
    _add_runs_list_indexes,
    _finer_outcome_buckets,
]


def normalise_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` use psycopg 3 (the driver this package installs)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # stored by us, always in UTC
    return value.astimezone(UTC)


aware = _utc
