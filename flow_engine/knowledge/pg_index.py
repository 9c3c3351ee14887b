"""Chunks on PostgreSQL with pgvector: approximate vector search on each base's own HNSW
cosine index, keyword search on a ``tsvector`` with a GIN index.

A base's index is partial (``WHERE kb_id = '<id>'``) on ``embedding::vector(d)``
(:mod:`flow_engine.knowledge.schema`), so a search must name the base as a constant the
planner can match and cast the same way: each search sets ``plan_cache_mode`` to
``force_custom_plan`` for its transaction (a generic plan would not use a partial index),
``hnsw.ef_search`` to ``knowledge_hnsw_ef_search`` (recall vs. speed; at least k) and, with a
metadata filter, ``hnsw.iterative_scan`` so that filtered-out neighbours do not leave the
answer short (pgvector ≥ 0.8).

Keyword ranking is ``ts_rank`` (length-normalised term frequency; PostgreSQL has no idf,
which is why keyword queries leave out stopwords) — scores differ from SQLite's BM25, the
order of clear-cut hits does not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flow_engine.knowledge import schema
from flow_engine.knowledge.fusion import tsquery
from flow_engine.knowledge.model import ChunkRow


def vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(map(str, vector.astype(np.float32).tolist())) + "]"


class PgIndex:
    def __init__(self, ef_search: int = 400) -> None:
        self.ef_search = ef_search

    def insert(self, conn: Connection, kb_id: str, doc_id: str, rows: Sequence[ChunkRow]) -> None:
        if rows:
            conn.execute(schema.chunks.insert(), [
                {"kb_id": kb_id, "doc_id": doc_id, "chunk": r.chunk, "text": r.text,
                 "metadata": r.metadata, "embedding": vector_literal(r.vector)} for r in rows])

    def delete(self, conn: Connection, kb_id: str, doc_id: str | None = None) -> None:
        query = schema.chunks.delete().where(schema.chunks.c.kb_id == kb_id)
        if doc_id is not None:
            query = query.where(schema.chunks.c.doc_id == doc_id)
        conn.execute(query)

    def prepare(self, conn: Connection, kb_id: str, dims: int) -> None:
        """The base's HNSW index (idempotent); run in its own transaction."""
        conn.execute(sa.text(schema.create_index_sql(kb_id, dims)))

    def drop(self, conn: Connection, kb_id: str) -> None:
        conn.execute(sa.text(schema.drop_index_sql(kb_id)))

    def vector(self, conn: Connection, kb_id: str, generation: int, dims: int,
               query: np.ndarray, k: int, metadata: dict[str, Any]) -> list[tuple[int, float]]:
        cast = schema.vector_cast(dims)
        settings = ("SELECT set_config('plan_cache_mode', 'force_custom_plan', true), "
                    "set_config('hnsw.ef_search', :ef, true)")
        if metadata:
            settings += ", set_config('hnsw.iterative_scan', 'relaxed_order', true)"
        conn.execute(sa.text(settings), {"ef": str(min(1000, max(self.ef_search, k)))})
        where, params = _metadata_sql(metadata)
        distance = f"(embedding::{cast}) <=> CAST(:q AS {cast})"
        rows = conn.execute(sa.text(
            f"SELECT id, {distance} AS d FROM knowledge_chunks "  # noqa: S608 - cast is int-built
            f"WHERE kb_id = :kb{where} ORDER BY {distance} LIMIT :k"),
            {"q": vector_literal(query), "kb": kb_id, "k": k, **params}).all()
        ranked = sorted(((int(r.id), 1.0 - float(r.d)) for r in rows), key=lambda x: (-x[1], x[0]))
        return [(cid, round(score, 6)) for cid, score in ranked]

    def exact(self, conn: Connection, kb_id: str, dims: int, query: np.ndarray,
              k: int) -> list[int]:
        """Exact nearest neighbours (a sequential scan), for measuring the index's recall."""
        conn.execute(sa.text("SET LOCAL enable_indexscan = off"))
        cast = schema.vector_cast(dims)
        rows = conn.execute(sa.text(
            f"SELECT id FROM knowledge_chunks WHERE kb_id = :kb "  # noqa: S608
            f"ORDER BY (embedding::{cast}) <=> CAST(:q AS {cast}), id LIMIT :k"),
            {"q": vector_literal(query), "kb": kb_id, "k": k}).all()
        return [int(r.id) for r in rows]

    def keyword(self, conn: Connection, kb_id: str, terms: Sequence[str], k: int,
                metadata: dict[str, Any]) -> list[tuple[int, float]]:
        if not terms:
            return []
        where, params = _metadata_sql(metadata)
        condition = f"kb_id = :kb AND tsv @@ q{where}"  # bound parameters only
        rows = conn.execute(sa.text(
            "SELECT id, ts_rank(tsv, q, 1) AS s FROM knowledge_chunks, "  # noqa: S608
            "to_tsquery('simple'::regconfig, :tq) AS q "
            "WHERE " + condition + " ORDER BY s DESC, id LIMIT :k"),
            {"tq": tsquery(terms), "kb": kb_id, "k": k, **params}).all()
        return [(int(r.id), round(float(r.s), 6)) for r in rows]


def _metadata_sql(metadata: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """JSONB containment: every key with exactly this value (and JSON type)."""
    if not metadata:
        return "", {}
    return " AND metadata @> CAST(:filter AS jsonb)", {"filter": json.dumps(metadata)}
