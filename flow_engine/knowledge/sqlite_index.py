"""Chunks on SQLite, the embedded default: exact vector search with numpy, keyword search
with FTS5.

Vectors are float32 blobs of unit length, so cosine similarity is one matrix-vector product.
Each base's vectors are kept in memory as one matrix per process, keyed by the base's
``generation`` (bumped in the same transaction as every change of its chunks): a search
reads the generation in its transaction and reloads the matrix only when it moved, so it
never mixes chunks of two generations. The matrices are bounded in bytes
(``knowledge_cache_bytes``), least recently used first out.

When not to use this: exact search costs O(chunks × dimensions) per query (about 10 ms at
100k chunks of 256 dimensions here) and every process holds the matrices; past a few
hundred thousand chunks, use PostgreSQL with pgvector (HNSW).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection

from flow_engine.knowledge.fusion import fts5_query
from flow_engine.knowledge.model import ChunkRow


@dataclass(frozen=True)
class _Matrix:
    generation: int
    ids: np.ndarray  # int64 chunk ids, ascending
    vectors: np.ndarray  # (n, d) float32

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.vectors.nbytes


class SqliteIndex:
    def __init__(self, cache_bytes: int = 512 * 1024 * 1024) -> None:
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, _Matrix] = OrderedDict()
        self._lock = threading.Lock()

    # -- writes (inside the caller's transaction) --------------------------------------------

    def insert(self, conn: Connection, kb_id: str, doc_id: str, rows: Sequence[ChunkRow]) -> None:
        if not rows:
            return
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.execute("SELECT coalesce(max(id), 0) FROM knowledge_chunks")
            first = cursor.fetchone()[0] + 1
            ids = range(first, first + len(rows))
            cursor.executemany(
                "INSERT INTO knowledge_chunks (id, kb_id, doc_id, chunk, text, metadata, embedding) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(i, kb_id, doc_id, r.chunk, r.text, json.dumps(r.metadata),
                  np.ascontiguousarray(r.vector, dtype="<f4").tobytes())
                 for i, r in zip(ids, rows, strict=True)])
            cursor.executemany("INSERT INTO knowledge_fts (rowid, text, kb_id) VALUES (?, ?, ?)",
                               [(i, r.text, kb_id) for i, r in zip(ids, rows, strict=True)])
        finally:
            cursor.close()

    def delete(self, conn: Connection, kb_id: str, doc_id: str | None = None) -> None:
        where, params = ("kb_id = ?", (kb_id,)) if doc_id is None else (
            "kb_id = ? AND doc_id = ?", (kb_id, doc_id))
        conn.exec_driver_sql(f"DELETE FROM knowledge_fts WHERE rowid IN "  # noqa: S608 - fixed text
                             f"(SELECT id FROM knowledge_chunks WHERE {where})", params)
        conn.exec_driver_sql(f"DELETE FROM knowledge_chunks WHERE {where}", params)  # noqa: S608

    def prepare(self, conn: Connection, kb_id: str, dims: int) -> None:
        """Nothing to build on SQLite (search is exact)."""

    def drop(self, conn: Connection, kb_id: str) -> None:
        with self._lock:
            self._cache.pop(kb_id, None)

    # -- searches (inside the caller's read transaction) -------------------------------------

    def vector(self, conn: Connection, kb_id: str, generation: int, dims: int,
               query: np.ndarray, k: int, metadata: dict[str, Any]) -> list[tuple[int, float]]:
        matrix = self._matrix(conn, kb_id, generation, dims)
        if not matrix.ids.size:
            return []
        scores = matrix.vectors @ query.astype(np.float32)
        if metadata:
            allowed = np.fromiter(self._matching(conn, kb_id, metadata), dtype=np.int64)
            scores = np.where(np.isin(matrix.ids, allowed), scores, -np.inf)
        n = min(k, int(np.isfinite(scores).sum()))
        if n == 0:
            return []
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.lexsort((matrix.ids[top], -scores[top]))]
        return [(int(matrix.ids[i]), round(float(scores[i]), 6)) for i in top]

    def keyword(self, conn: Connection, kb_id: str, terms: Sequence[str], k: int,
                metadata: dict[str, Any]) -> list[tuple[int, float]]:
        if not terms:
            return []
        where, params = metadata_sql(metadata, "c.metadata")
        condition = f"knowledge_fts MATCH ? AND knowledge_fts.kb_id = ?{where}"  # ? params only
        sql = ("SELECT knowledge_fts.rowid, bm25(knowledge_fts) AS s FROM knowledge_fts "  # noqa: S608
               "JOIN knowledge_chunks c ON c.id = knowledge_fts.rowid "
               "WHERE " + condition + " ORDER BY s, knowledge_fts.rowid LIMIT ?")
        rows = conn.exec_driver_sql(sql, (fts5_query(terms), kb_id, *params, k)).all()
        return [(int(r[0]), round(-float(r[1]), 6)) for r in rows]

    def _matching(self, conn: Connection, kb_id: str, metadata: dict[str, Any]):
        where, params = metadata_sql(metadata, "metadata")
        rows = conn.exec_driver_sql(
            f"SELECT id FROM knowledge_chunks WHERE kb_id = ?{where}", (kb_id, *params))  # noqa: S608
        return (r[0] for r in rows)

    def _matrix(self, conn: Connection, kb_id: str, generation: int, dims: int) -> _Matrix:
        with self._lock:
            cached = self._cache.get(kb_id)
            if cached is not None and cached.generation == generation:
                self._cache.move_to_end(kb_id)
                return cached
        rows = conn.exec_driver_sql(
            "SELECT id, embedding FROM knowledge_chunks WHERE kb_id = ? ORDER BY id", (kb_id,)).all()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(r[1] for r in rows)
        vectors = np.frombuffer(blob, dtype="<f4").reshape(len(rows), dims) if rows else \
            np.zeros((0, dims), dtype=np.float32)
        matrix = _Matrix(generation, ids, vectors)
        with self._lock:
            self._cache[kb_id] = matrix
            self._cache.move_to_end(kb_id)
            while (sum(m.nbytes for m in self._cache.values()) > self.cache_bytes
                   and len(self._cache) > 1):
                self._cache.popitem(last=False)
        return matrix


_JSON_TYPES = {str: ("text",), bool: ("true", "false"), int: ("integer", "real"),
               float: ("integer", "real")}


def metadata_sql(metadata: dict[str, Any], column: str) -> tuple[str, list[Any]]:
    """`` AND ...`` conditions (and their parameters) for exact matches on metadata keys:
    the value and its JSON type (so ``"1"``, ``1`` and ``true`` stay different). Keys were
    checked against ``[A-Za-z0-9_.-]`` and are quoted in the JSON path as well."""
    parts, params = [], []
    for key, value in metadata.items():
        path = f'$."{key}"'
        types = _JSON_TYPES[type(value)]
        marks = ", ".join("?" for _ in types)
        parts.append(f" AND json_extract({column}, ?) = ? AND json_type({column}, ?) IN ({marks})")
        params += [path, int(value) if isinstance(value, bool) else value, path, *types]
    return "".join(parts), params
