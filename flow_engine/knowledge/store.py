"""Knowledge bases, documents and the indexing queue in SQL (SQLAlchemy Core, on the flow
store's engine), with the chunks delegated to the backend's index (SQLite or pgvector).

The queue is the documents table itself, so every engine process and replica shares it:
an upload stores its bytes and marks the document ``queued``; a process *claims* it with a
conditional UPDATE (``queued`` → ``indexing``, its owner id, a heartbeat), so exactly one
claim wins; the owner refreshes the heartbeat while it works. A document whose owner went
silent for ``stale_s`` is put back in the queue (or failed, after ``max_attempts``).

Replacing a document is one transaction (:meth:`finish_ready`): the previous version's
chunks out, the new ones in, the document ``ready`` and the base's ``generation`` bumped.
A search reads in one transaction too, so it sees the old chunks or the new, never both
or neither; and chunks are only ever written there, so a half-indexed document is never
visible. The transaction only commits if the claim still holds (same version, same
owner): a newer upload, a delete, or another process that took the document over wins.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from flow_engine.errors import Conflict
from flow_engine.knowledge import schema
from flow_engine.knowledge.errors import DocumentNotFound, KnowledgeNotFound
from flow_engine.knowledge.model import (
    Chunking,
    ChunkRow,
    DocumentRecord,
    EmbeddingSpec,
    KnowledgeBase,
    NewBase,
)
from flow_engine.store.base import StoreError
from flowgate.common.backoff import Backoff

now = schema.now
B, D, U, C = schema.bases, schema.documents, schema.uploads, schema.chunks


@dataclass(frozen=True)
class Upload:
    kb_id: str
    doc_id: str
    version: int
    kind: str
    metadata: dict[str, Any]
    data: bytes


@dataclass(frozen=True)
class ChunkText:
    id: int
    doc_id: str
    document: str
    chunk: int
    text: str
    metadata: dict[str, Any]


class KnowledgeStore:
    def __init__(self, engine: Engine, index: Any, *, lock_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.index = index
        self.is_sqlite = engine.dialect.name == "sqlite"
        self.lock_timeout_s = lock_timeout_s

    # -- transactions --------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._guard(), self.engine.connect() as conn:
            conn = conn.execution_options(flowgate_write=True)  # SQLite: BEGIN IMMEDIATE
            with self._begin(conn):
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One snapshot for every statement inside (SQLite WAL: a deferred transaction;
        PostgreSQL: REPEATABLE READ), so a search never mixes two versions."""
        with self._guard(), self.engine.connect() as conn:
            if not self.is_sqlite:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise StoreError("the knowledge store is unavailable; retry shortly") from exc

    def _begin(self, conn: Connection):
        if not self.is_sqlite:
            return conn.begin()
        deadline = time.monotonic() + self.lock_timeout_s
        delays = Backoff(0.0005, 0.02).delays()
        while True:  # wait for SQLite's write lock cooperatively (time.sleep under gevent)
            try:
                return conn.begin()
            except (OperationalError, sqlite3.OperationalError) as exc:
                if conn.in_transaction():
                    conn.rollback()
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
            time.sleep(next(delays))

    # -- bases ---------------------------------------------------------------------------------

    def create_base(self, new: NewBase, actor: str | None) -> KnowledgeBase:
        stamp = now()
        try:
            with self.write() as conn:
                taken = conn.execute(sa.select(B.c.id).where(
                    sa.or_(B.c.id == new.id, B.c.name == new.name))).first()
                if taken is not None:
                    what = f"id '{new.id}'" if taken.id == new.id else f"name '{new.name}'"
                    raise Conflict(f"a knowledge base with {what} already exists")
                conn.execute(B.insert().values(
                    id=new.id, name=new.name, embedding=new.embedding.as_dict(),
                    chunking=new.chunking.as_dict(), dimensions=new.embedding.dimensions,
                    generation=0, created_by=actor, created_at=stamp, updated_at=stamp))
        except IntegrityError:
            raise Conflict(f"a knowledge base with id '{new.id}' or name '{new.name}' "
                           "already exists") from None
        if new.embedding.dimensions:
            self.prepare(new.id, new.embedding.dimensions)
        return self.get_base(new.id)

    def prepare(self, kb_id: str, dims: int) -> None:
        """The base's vector index for ``dims`` (PostgreSQL's HNSW; nothing on SQLite)."""
        with self.write() as conn:
            self.index.prepare(conn, kb_id, dims)

    def get_base(self, ref: str, conn: Connection | None = None) -> KnowledgeBase:
        with contextlib.ExitStack() as stack:
            conn = conn or stack.enter_context(self.read())
            row = conn.execute(sa.select(B).where(B.c.id == ref)).first() or \
                conn.execute(sa.select(B).where(B.c.name == ref)).first()
        if row is None:
            raise KnowledgeNotFound(f"no knowledge base with id or name '{ref[:200]}'")
        return _base(row)

    def list_bases(self, limit: int, offset: int) -> list[KnowledgeBase]:
        with self.read() as conn:
            rows = conn.execute(sa.select(B).order_by(B.c.created_at, B.c.id)
                                .limit(limit).offset(offset)).all()
        return [_base(r) for r in rows]

    def counts(self, kb_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per base: documents by status, and the chunks searches see."""
        out = {kb: {"documents": 0, "chunks": 0, **dict.fromkeys(
            ("queued", "indexing", "ready", "failed"), 0)} for kb in kb_ids}
        if not kb_ids:
            return out
        with self.read() as conn:
            rows = conn.execute(sa.select(D.c.kb_id, D.c.status, sa.func.count(),
                                          sa.func.coalesce(sa.func.sum(D.c.chunks), 0))
                                .where(D.c.kb_id.in_(list(kb_ids)))
                                .group_by(D.c.kb_id, D.c.status)).all()
        for kb, status, n, chunk_count in rows:
            out[kb][status] = n
            out[kb]["documents"] += n
            out[kb]["chunks"] += int(chunk_count)
        return out

    def delete_base(self, kb_id: str) -> None:
        with self.write() as conn:
            self.get_base(kb_id, conn)
            self.index.delete(conn, kb_id)
            conn.execute(U.delete().where(U.c.kb_id == kb_id))
            conn.execute(D.delete().where(D.c.kb_id == kb_id))
            conn.execute(B.delete().where(B.c.id == kb_id))
            self.index.drop(conn, kb_id)

    # -- documents -------------------------------------------------------------------------------

    def put_upload(self, kb_id: str, name: str, *, kind: str, content_type: str, data: bytes,
                   sha256: str, metadata: dict[str, Any], actor: str | None) -> DocumentRecord:
        """A new upload of document ``name``: queued; a document of that name keeps serving
        its current chunks until this upload is indexed."""
        stamp = now()
        for _ in range(3):  # a concurrent first upload of the same name: once more
            try:
                with self.write() as conn:
                    self.get_base(kb_id, conn)
                    row = conn.execute(sa.select(D.c.id, D.c.version).where(
                        D.c.kb_id == kb_id, D.c.name == name)).first()
                    values = dict(status="queued", content_type=content_type, bytes=len(data),
                                  sha256=sha256, metadata=metadata, attempts=0, owner=None,
                                  heartbeat_at=None, error=None, updated_at=stamp)
                    if row is None:
                        doc_id, version = "doc-" + secrets.token_hex(6), 1
                        conn.execute(D.insert().values(
                            kb_id=kb_id, id=doc_id, name=name, version=1, live_version=None,
                            chunks=0, created_by=actor, created_at=stamp, **values))
                    else:
                        doc_id, version = row.id, row.version + 1
                        conn.execute(D.update().where(D.c.kb_id == kb_id, D.c.id == doc_id)
                                     .values(version=version, **values))
                        conn.execute(U.delete().where(U.c.kb_id == kb_id, U.c.doc_id == doc_id))
                    conn.execute(U.insert().values(kb_id=kb_id, doc_id=doc_id, version=version,
                                                   kind=kind, metadata=metadata, data=data,
                                                   created_at=stamp))
                return self.get_document(kb_id, doc_id)
            except IntegrityError:
                continue
        raise Conflict(f"document '{name}' is being uploaded concurrently; retry")

    def get_document(self, kb_id: str, ref: str) -> DocumentRecord:
        with self.read() as conn:
            row = conn.execute(sa.select(D).where(D.c.kb_id == kb_id, D.c.id == ref)).first() or \
                conn.execute(sa.select(D).where(D.c.kb_id == kb_id, D.c.name == ref)).first()
        if row is None:
            raise DocumentNotFound(f"knowledge base '{kb_id}' has no document '{ref[:200]}'")
        return _document(row)

    def list_documents(self, kb_id: str, limit: int, offset: int,
                       status: str | None = None) -> list[DocumentRecord]:
        query = sa.select(D).where(D.c.kb_id == kb_id)
        if status:
            query = query.where(D.c.status == status)
        with self.read() as conn:
            rows = conn.execute(query.order_by(D.c.name).limit(limit).offset(offset)).all()
        return [_document(r) for r in rows]

    def delete_document(self, kb_id: str, doc_id: str) -> None:
        with self.write() as conn:
            self.index.delete(conn, kb_id, doc_id)
            conn.execute(U.delete().where(U.c.kb_id == kb_id, U.c.doc_id == doc_id))
            conn.execute(D.delete().where(D.c.kb_id == kb_id, D.c.id == doc_id))
            _bump(conn, kb_id)

    # -- the queue -------------------------------------------------------------------------------

    def claim(self, owner: str, limit: int) -> list[tuple[str, str, int]]:
        """Claim up to ``limit`` queued documents for ``owner``: (kb, doc, version) each."""
        with self.read() as conn:
            candidates = conn.execute(sa.select(D.c.kb_id, D.c.id, D.c.version)
                                      .where(D.c.status == "queued")
                                      .order_by(D.c.updated_at).limit(limit * 4)).all()
        claimed = []
        for kb_id, doc_id, version in candidates:
            if len(claimed) >= limit:
                break
            with self.write() as conn:
                done = conn.execute(D.update().where(
                    D.c.kb_id == kb_id, D.c.id == doc_id, D.c.version == version,
                    D.c.status == "queued").values(
                    status="indexing", owner=owner, heartbeat_at=now(),
                    attempts=D.c.attempts + 1, updated_at=now()))
            if done.rowcount == 1:
                claimed.append((kb_id, doc_id, version))
        return claimed

    def heartbeat(self, owner: str) -> None:
        with self.write() as conn:
            conn.execute(D.update().where(D.c.owner == owner, D.c.status == "indexing")
                         .values(heartbeat_at=now()))

    def recover(self, stale_s: float, max_attempts: int, *,
                at: datetime | None = None) -> tuple[int, int]:
        """Put documents whose indexer went silent back in the queue, or fail those that
        were interrupted ``max_attempts`` times. Returns (requeued, failed)."""
        cutoff = (at or now()) - timedelta(seconds=stale_s)
        stale = sa.and_(D.c.status == "indexing", D.c.heartbeat_at < cutoff)
        with self.write() as conn:
            failed = conn.execute(D.update().where(stale, D.c.attempts >= max_attempts).values(
                status="failed", owner=None, heartbeat_at=None, updated_at=now(),
                error=(f"indexing was interrupted {max_attempts} times (the engine indexing "
                       "it stopped); upload the document again"))).rowcount
            requeued = conn.execute(D.update().where(stale).values(
                status="queued", owner=None, heartbeat_at=None, updated_at=now())).rowcount
            if failed:
                conn.execute(U.delete().where(sa.tuple_(U.c.kb_id, U.c.doc_id).in_(
                    sa.select(D.c.kb_id, D.c.id).where(D.c.status == "failed"))))
        return requeued, failed

    def release(self, owner: str) -> int:
        """At shutdown: this process's documents back in the queue for another to finish."""
        with self.write() as conn:
            return conn.execute(D.update().where(D.c.owner == owner, D.c.status == "indexing")
                                .values(status="queued", owner=None, heartbeat_at=None,
                                        attempts=D.c.attempts - 1)).rowcount

    def busy(self) -> tuple[int, int]:
        """(queued, indexing) documents over every base and process."""
        with self.read() as conn:
            rows = dict(conn.execute(sa.select(D.c.status, sa.func.count()).where(
                D.c.status.in_(("queued", "indexing"))).group_by(D.c.status)).all())
        return rows.get("queued", 0), rows.get("indexing", 0)

    def load_upload(self, kb_id: str, doc_id: str, version: int) -> Upload | None:
        with self.read() as conn:
            row = conn.execute(sa.select(U).where(U.c.kb_id == kb_id, U.c.doc_id == doc_id,
                                                  U.c.version == version)).first()
        return None if row is None else Upload(kb_id, doc_id, version, row.kind,
                                               dict(row.metadata or {}), bytes(row.data))

    def still_mine(self, kb_id: str, doc_id: str, version: int, owner: str) -> bool:
        with self.read() as conn:
            return conn.execute(sa.select(D.c.id).where(_claimed(kb_id, doc_id, version, owner))
                                ).first() is not None

    def finish_ready(self, kb_id: str, doc_id: str, version: int, owner: str,
                     rows: Sequence[ChunkRow], dims: int) -> bool:
        """Swap the document's chunks for ``rows`` atomically; False if the claim was lost."""
        with self.write() as conn:
            if not self.is_sqlite:  # one swap per document at a time
                conn.execute(sa.select(D.c.id).where(D.c.kb_id == kb_id, D.c.id == doc_id)
                             .with_for_update())
            if conn.execute(sa.select(D.c.id).where(_claimed(kb_id, doc_id, version, owner))
                            ).first() is None:
                return False
            self.index.delete(conn, kb_id, doc_id)
            self.index.insert(conn, kb_id, doc_id, rows)
            conn.execute(D.update().where(D.c.kb_id == kb_id, D.c.id == doc_id).values(
                status="ready", live_version=version, chunks=len(rows), error=None, owner=None,
                heartbeat_at=None, updated_at=now()))
            conn.execute(U.delete().where(U.c.kb_id == kb_id, U.c.doc_id == doc_id,
                                          U.c.version <= version))
            _bump(conn, kb_id, dims)
        return True

    def finish_failed(self, kb_id: str, doc_id: str, version: int, owner: str,
                      error: str) -> bool:
        with self.write() as conn:
            done = conn.execute(D.update().where(_claimed(kb_id, doc_id, version, owner)).values(
                status="failed", error=error[:2000], owner=None, heartbeat_at=None,
                updated_at=now())).rowcount
            if done:
                conn.execute(U.delete().where(U.c.kb_id == kb_id, U.c.doc_id == doc_id,
                                              U.c.version <= version))
        return bool(done)

    # -- what searches return ----------------------------------------------------------------

    def chunk_texts(self, conn: Connection, kb_id: str, ids: Sequence[int]) -> dict[int, ChunkText]:
        if not ids:
            return {}
        rows = conn.execute(sa.select(C.c.id, C.c.doc_id, C.c.chunk, C.c.text, C.c.metadata,
                                      D.c.name).join(D, sa.and_(D.c.kb_id == C.c.kb_id,
                                                                D.c.id == C.c.doc_id))
                            .where(C.c.kb_id == kb_id, C.c.id.in_(list(ids)))).all()
        return {r.id: ChunkText(r.id, r.doc_id, r.name, r.chunk, r.text, dict(r.metadata or {}))
                for r in rows}


def _claimed(kb_id: str, doc_id: str, version: int, owner: str):
    return sa.and_(D.c.kb_id == kb_id, D.c.id == doc_id, D.c.version == version,
                   D.c.status == "indexing", D.c.owner == owner)


def _bump(conn: Connection, kb_id: str, dims: int | None = None) -> None:
    values: dict[str, Any] = {"generation": B.c.generation + 1, "updated_at": now()}
    if dims is not None:
        values["dimensions"] = sa.func.coalesce(B.c.dimensions, dims)
    conn.execute(B.update().where(B.c.id == kb_id).values(**values))


def _base(row: sa.Row) -> KnowledgeBase:
    spec, chunking = row.embedding or {}, row.chunking or {}
    return KnowledgeBase(
        id=row.id, name=row.name,
        embedding=EmbeddingSpec(spec.get("provider", "openai"), spec.get("model", ""),
                                spec.get("dimensions"), spec.get("base_url")),
        chunking=Chunking(chunking.get("size", 1000), chunking.get("overlap", 200)),
        dimensions=row.dimensions, generation=row.generation, created_at=row.created_at,
        updated_at=row.updated_at, created_by=row.created_by)


def _document(row: sa.Row) -> DocumentRecord:
    return DocumentRecord(
        kb_id=row.kb_id, id=row.id, name=row.name, status=row.status, chunks=row.chunks,
        error=row.error, content_type=row.content_type, bytes=row.bytes, sha256=row.sha256,
        metadata=dict(row.metadata or {}), version=row.version, live_version=row.live_version,
        attempts=row.attempts, created_at=row.created_at, updated_at=row.updated_at)

