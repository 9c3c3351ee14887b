"""The knowledge tables, on SQLite and on PostgreSQL.

    knowledge_bases      one row per base: embedding spec, chunking, learned dimensions and
                         a ``generation`` bumped by every change of its chunks
    knowledge_documents  one row per (base, document name): the latest upload's status and
                         the version whose chunks searches see (``live_version``)
    knowledge_uploads    bytes of uploads not yet indexed (deleted once ready or failed):
                         documents live in the database, never in files
    knowledge_chunks     the searchable chunks: text, a copy of the document's metadata (for
                         filters), the embedding

SQLite: embeddings are float32 blobs searched exactly (numpy); keyword search is the FTS5
table ``knowledge_fts`` (rowid = chunk id). PostgreSQL: embeddings are pgvector ``vector``
values of any dimension, each base with its own partial HNSW cosine index on
``embedding::vector(d)`` (``halfvec`` above 2000 dimensions), created when its dimension is
known (pgvector's recipe for mixed dimensions in one column); keyword search is a stored
``tsvector`` column (``simple`` configuration) with a GIN index.

:func:`ensure` creates what is missing and is idempotent; it is the migration appended to
the store's ``MIGRATIONS`` and also runs at start when :func:`problem` finds the schema
incomplete (pgvector installed after the migration ran), under an advisory lock.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection

metadata = sa.MetaData()
JSON = sa.JSON().with_variant(JSONB(), "postgresql")
HALFVEC_ABOVE = 2000  # pgvector indexes vector up to 2000 dimensions, halfvec up to 4000
_LOCK = 727274  # pg_advisory_xact_lock key of knowledge DDL (the store's is 727272)


def now() -> datetime:
    return datetime.now(UTC)


class UTCTimestamp(sa.TypeDecorator):
    """Aware UTC in and out, whatever the backend (SQLite keeps no zone), like the flow
    store's timestamps (kept apart so this package does not depend on its internals)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return _utc(value)

    def process_result_value(self, value, dialect):
        return _utc(value)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


TS = UTCTimestamp()


class Vector(sa.types.UserDefinedType):
    """pgvector's ``vector`` without a fixed dimension (the HNSW indexes cast per base)."""

    cache_ok = True

    def get_col_spec(self, **kw) -> str:
        return "vector"


EMBEDDING = sa.LargeBinary().with_variant(Vector(), "postgresql")

bases = sa.Table(
    "knowledge_bases", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("embedding", sa.JSON, nullable=False),
    sa.Column("chunking", sa.JSON, nullable=False),
    sa.Column("dimensions", sa.Integer, nullable=True),
    sa.Column("generation", sa.Integer, nullable=False, default=0),
    sa.Column("created_by", sa.String(200), nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)
documents = sa.Table(
    "knowledge_documents", metadata,
    sa.Column("kb_id", sa.String(64), sa.ForeignKey("knowledge_bases.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("live_version", sa.Integer, nullable=True),
    sa.Column("chunks", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("content_type", sa.String(100), nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("owner", sa.String(100), nullable=True),  # the engine process indexing it
    sa.Column("heartbeat_at", TS, nullable=True),  # its owner refreshes this while indexing
    sa.Column("created_by", sa.String(200), nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.UniqueConstraint("kb_id", "name", name="uq_knowledge_document_name"),
    sa.Index("ix_knowledge_documents_status", "status"),
)
uploads = sa.Table(
    "knowledge_uploads", metadata,
    sa.Column("kb_id", sa.String(64), primary_key=True),
    sa.Column("doc_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.ForeignKeyConstraint(["kb_id", "doc_id"], ["knowledge_documents.kb_id",
                                                  "knowledge_documents.id"], ondelete="CASCADE"),
)
chunks = sa.Table(
    "knowledge_chunks", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("kb_id", sa.String(64), nullable=False),
    sa.Column("doc_id", sa.String(64), nullable=False),
    sa.Column("chunk", sa.Integer, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("metadata", JSON, nullable=False),
    sa.Column("embedding", EMBEDDING, nullable=False),
    sa.Index("ix_knowledge_chunks_doc", "kb_id", "doc_id"),
)

_FTS = ("CREATE VIRTUAL TABLE IF NOT EXISTS knowledge_fts USING fts5("
        "text, kb_id UNINDEXED, tokenize = 'unicode61 remove_diacritics 2')")
_TSV = ("ALTER TABLE knowledge_chunks ADD COLUMN IF NOT EXISTS tsv tsvector "
        "GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, text)) STORED")
_TSV_INDEX = "CREATE INDEX IF NOT EXISTS ix_knowledge_chunks_tsv ON knowledge_chunks USING gin (tsv)"
MISSING_VECTOR = (
    "PostgreSQL lacks the 'vector' extension (pgvector), which knowledge bases need to store "
    "embeddings: install pgvector on the database server (https://github.com/pgvector/pgvector, "
    "e.g. the postgresql-16-pgvector package or the pgvector/pgvector image) and restart the "
    "engine, or set FLOW_ENGINE_KNOWLEDGE=off")


MIN_PGVECTOR = (0, 8)  # hnsw.iterative_scan: filtered searches that are not left short


def pgvector_problem(version: str | None) -> str | None:
    """Why this pgvector version is too old (None: it will do)."""
    if version is None:
        return None
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None  # a build we cannot read: let it try
    if found >= MIN_PGVECTOR:
        return None
    return (f"the 'vector' extension (pgvector) is version {version}; knowledge bases need "
            f"{MIN_PGVECTOR[0]}.{MIN_PGVECTOR[1]} or later (iterative index scans): upgrade "
            "pgvector on the server, then run ALTER EXTENSION vector UPDATE")


def _version_problem(conn: Connection) -> str | None:
    return pgvector_problem(conn.execute(sa.text(
        "SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar())


def ensure(conn: Connection) -> str | None:
    """Create the knowledge schema where possible; the reason it is unusable, else None.
    Idempotent; on PostgreSQL serialised with other starters by an advisory lock."""
    if conn.dialect.name == "sqlite":
        metadata.create_all(conn, checkfirst=True)
        try:
            conn.exec_driver_sql(_FTS)
        except sa.exc.OperationalError as exc:
            return f"this SQLite has no FTS5 full-text search ({exc.orig}); knowledge bases need it"
        return None
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK})
    if conn.execute(sa.text("SELECT to_regtype('vector')")).scalar() is None:
        available = conn.execute(sa.text(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first()
        if available is None:
            return MISSING_VECTOR
        try:
            with conn.begin_nested():
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
        except sa.exc.DBAPIError as exc:
            return ("the 'vector' extension (pgvector) is installed on the server but could not "
                    f"be created in this database ({str(exc.orig).strip()[:200]}); ask a "
                    "superuser to run CREATE EXTENSION vector")
        if conn.execute(sa.text("SELECT to_regtype('vector')")).scalar() is None:
            return ("the 'vector' extension exists in a schema outside this connection's "
                    "search_path; add that schema to the search_path")
    if (old := _version_problem(conn)) is not None:
        return old
    metadata.create_all(conn, checkfirst=True)
    conn.execute(sa.text(_TSV))
    conn.execute(sa.text(_TSV_INDEX))
    return None


def problem(conn: Connection) -> str | None:
    """Read-only: why the knowledge schema cannot be used as it is (None: it can)."""
    if conn.dialect.name == "sqlite":
        names = {r[0] for r in conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE name IN ('knowledge_chunks', 'knowledge_fts')")}
        return None if len(names) == 2 else "the knowledge tables are missing"
    row = conn.execute(sa.text(
        "SELECT to_regtype('vector'), to_regclass('knowledge_chunks'), "
        "(SELECT 1 FROM information_schema.columns WHERE table_name = 'knowledge_chunks' "
        "AND column_name = 'tsv' AND table_schema = ANY (current_schemas(false)) LIMIT 1)")).first()
    if row[0] is None:
        return MISSING_VECTOR
    if (old := _version_problem(conn)) is not None:
        return old
    return None if row[1] is not None and row[2] is not None else "the knowledge tables are missing"


def vector_cast(dims: int) -> str:
    """The SQL type a base's vectors are compared as (and indexed on)."""
    return f"{'halfvec' if dims > HALFVEC_ABOVE else 'vector'}({int(dims)})"


def index_name(kb_id: str) -> str:
    return "kbv_" + hashlib.sha256(kb_id.encode()).hexdigest()[:24]


def create_index_sql(kb_id: str, dims: int) -> str:
    """The partial HNSW index of one base. The id is a validated ``[A-Za-z0-9_.-]`` token;
    quotes are doubled anyway, as any literal in DDL must be."""
    ops = "halfvec_cosine_ops" if dims > HALFVEC_ABOVE else "vector_cosine_ops"
    literal = kb_id.replace("'", "''")
    return (f"CREATE INDEX IF NOT EXISTS {index_name(kb_id)} ON knowledge_chunks USING hnsw "
            f"((embedding::{vector_cast(dims)}) {ops}) WHERE kb_id = '{literal}'")


def drop_index_sql(kb_id: str) -> str:
    return f"DROP INDEX IF EXISTS {index_name(kb_id)}"
