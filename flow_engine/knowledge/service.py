"""The knowledge service of one engine process: what the API and the KnowledgeRetriever
node call. It owns the store, the backend's chunk index, the embedding clients and the
background :class:`~flow_engine.knowledge.ingest.Ingestor`.

Availability (``FLOW_ENGINE_KNOWLEDGE``): on SQLite knowledge bases always work; on
PostgreSQL they need the ``vector`` extension (pgvector). ``on`` refuses to start without
it (ConfigError naming the extension); ``auto`` (the default) starts anyway, logs the same
message as a warning and answers the knowledge routes with 503 ``knowledge_unavailable``
(so an existing deployment without pgvector keeps running flows); ``off`` never touches the
knowledge tables. At start the schema is completed if it can be (pgvector installed after
the migration ran), indexing interrupted by a dead engine is recovered, and queued
documents are indexed.

Tenancy: knowledge bases are shared like flows — an editor's base can be searched by any
runner and used by any flow; keep confidential documents in an engine of their own.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from flow_engine.components.openai_compat import ProviderError, ProviderResponseError, RetryPolicy
from flow_engine.egress import ProviderOrigins
from flow_engine.knowledge import parse, schema
from flow_engine.knowledge.embeddings import EmbeddingClient, client_for
from flow_engine.knowledge.errors import KnowledgeNotFound, KnowledgeUnavailable
from flow_engine.knowledge.fusion import fuse, keyword_terms
from flow_engine.knowledge.ingest import Ingestor
from flow_engine.knowledge.model import (
    DocumentRecord,
    Hit,
    KnowledgeBase,
    SearchRequest,
    parse_create,
)
from flow_engine.knowledge.pg_index import PgIndex
from flow_engine.knowledge.settings import KnowledgeSettings
from flow_engine.knowledge.sqlite_index import SqliteIndex
from flow_engine.knowledge.store import KnowledgeStore

log = logging.getLogger("flow_engine.knowledge")


class KnowledgeConfigError(ValueError):
    """The engine cannot start with knowledge bases as configured (FLOW_ENGINE_KNOWLEDGE=on
    on a database without pgvector); the message names what is missing."""


def preflight(store: KnowledgeStore | Any, mode: str) -> str | None:
    """Complete the knowledge schema if it can be; why knowledge bases cannot be used (None:
    they can). KnowledgeConfigError when ``mode`` is ``on`` and they cannot. ``flowgate
    engine`` runs this in the master, so a missing pgvector stops it with the message."""
    if mode == "off":
        return "knowledge bases are off on this engine (FLOW_ENGINE_KNOWLEDGE=off)"
    if not isinstance(store, KnowledgeStore):
        store = KnowledgeStore(store.engine, None)
    with store.read() as conn:
        reason = schema.problem(conn)
    if reason is not None:
        with store.write() as conn:
            reason = schema.ensure(conn)
    if reason is not None and mode == "on":
        raise KnowledgeConfigError(f"FLOW_ENGINE_KNOWLEDGE=on: {reason}")
    return reason


class KnowledgeService:
    def __init__(self, engine: Any, settings: KnowledgeSettings, *,
                 egress: ProviderOrigins | None = None, openai_base_url: str | None = None,
                 openai_api_key: str | None = None, sleep: Callable[[float], None] = time.sleep,
                 poll_s: float = 1.0, model_aliases: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.model_aliases = dict(model_aliases or {})  # FLOW_ENGINE_MODEL_ALIASES
        self.egress = egress
        self.openai_base_url = openai_base_url
        self.openai_api_key = openai_api_key
        self.sleep = sleep  # between embedding retries: injectable so tests never wait
        is_sqlite = engine.dialect.name == "sqlite"
        index = SqliteIndex(settings.knowledge_cache_bytes) if is_sqlite else \
            PgIndex(settings.knowledge_hnsw_ef_search)
        self.store = KnowledgeStore(engine, index)
        self.ingestor = Ingestor(self.store, settings, self._ingest_client, poll_s=poll_s)
        self.reason: str | None = "not started"
        self._clients: dict[tuple, EmbeddingClient] = {}
        self._clients_lock = threading.Lock()

    @classmethod
    def for_engine(cls, settings: Any, flow_store: Any, **options: Any) -> KnowledgeService:
        """The service for an engine's Settings and SqlFlowStore, started."""
        service = cls(flow_store.engine, KnowledgeSettings.from_settings(settings),
                      egress=settings.egress, openai_base_url=settings.openai_base_url,
                      openai_api_key=settings.openai_api_key,
                      model_aliases=settings.aliases, **options)
        return service.start()

    # -- life --------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self.reason is None

    def start(self) -> KnowledgeService:
        self.reason = preflight(self.store, self.settings.knowledge)
        if self.reason is not None:
            if self.settings.knowledge != "off":
                log.warning("knowledge bases are unavailable: %s", self.reason)
            return self
        self.store.recover(self.settings.knowledge_stale_s, self.settings.knowledge_max_attempts)
        if any(self.store.busy()):
            self.ingestor.wake()
        atexit.register(self.close)
        return self

    def close(self) -> None:
        if self.available:
            self.ingestor.close()
        atexit.unregister(self.close)

    def require(self) -> None:
        if self.reason is not None:
            raise KnowledgeUnavailable(self.reason)

    # -- bases and documents ------------------------------------------------------------------

    def create(self, body: Any, actor: str | None) -> KnowledgeBase:
        self.require()
        return self.store.create_base(parse_create(body, self.egress), actor)

    def base(self, ref: str) -> KnowledgeBase:
        self.require()
        return self.store.get_base(ref)

    def bases(self, limit: int, offset: int) -> list[KnowledgeBase]:
        self.require()
        return self.store.list_bases(limit, offset)

    def delete(self, ref: str) -> None:
        self.store.delete_base(self.base(ref).id)

    def upload(self, kb_ref: str, name: str, *, kind: str, data: bytes,
               metadata: dict[str, Any], actor: str | None) -> DocumentRecord:
        """Accept a document (checked, not yet parsed) and queue it for indexing."""
        kb = self.base(kb_ref)
        parse.check_upload(kind, data)
        record = self.store.put_upload(
            kb.id, name, kind=kind, content_type=parse.MIME[kind], data=data,
            sha256=hashlib.sha256(data).hexdigest(), metadata=metadata, actor=actor)
        self.ingestor.wake()
        return record

    def document(self, kb_ref: str, doc_ref: str) -> DocumentRecord:
        return self.store.get_document(self.base(kb_ref).id, doc_ref)

    def documents(self, kb_ref: str, limit: int, offset: int,
                  status: str | None = None) -> list[DocumentRecord]:
        return self.store.list_documents(self.base(kb_ref).id, limit, offset, status)

    def delete_document(self, kb_ref: str, doc_ref: str) -> None:
        doc = self.document(kb_ref, doc_ref)
        self.store.delete_document(doc.kb_id, doc.id)

    # -- search (the API and the KnowledgeRetriever node) ------------------------------------

    def problem(self, kb_ref: str) -> str | None:
        """Why a flow cannot use this base (None: it can)."""
        if self.reason is not None:
            return f"knowledge bases are unavailable on this engine: {self.reason}"
        try:
            self.store.get_base(kb_ref)
        except KnowledgeNotFound:
            return f"no knowledge base with id or name '{kb_ref}' (GET /api/v1/knowledge lists them)"
        return None

    def search(self, kb_ref: str, request: SearchRequest) -> list[Hit]:
        """The top ``k`` chunks; ProviderError when the query could not be embedded."""
        kb = self.base(kb_ref)
        query_vector = None
        if request.mode != "keyword" and kb.dimensions:  # no vectors yet: nothing to compare
            query_vector = self._search_client(kb).embed([request.query])[0]
            if query_vector.shape[0] != kb.dimensions:
                raise ProviderResponseError(
                    f"the query embedding has {query_vector.shape[0]} dimensions; this "
                    f"knowledge base holds {kb.dimensions}")
        depth = request.k if request.mode != "hybrid" else min(100, max(2 * request.k, 20))
        terms = keyword_terms(request.query) if request.mode != "vector" else []
        index = self.store.index
        with self.store.read() as conn:
            current = self.store.get_base(kb.id, conn)  # this snapshot's generation
            by_vector = by_keyword = []
            if query_vector is not None and current.dimensions == kb.dimensions:
                by_vector = index.vector(conn, kb.id, current.generation, kb.dimensions,
                                         query_vector, depth, request.metadata)
            if terms:
                by_keyword = index.keyword(conn, kb.id, terms, depth, request.metadata)
            if request.mode == "hybrid":
                ranked = fuse([by_vector, by_keyword], request.k)
            else:
                ranked = (by_vector or by_keyword)[:request.k]
            texts = self.store.chunk_texts(conn, kb.id, [cid for cid, _ in ranked])
        return [Hit(t.doc_id, t.document, t.chunk, t.text, score, t.metadata)
                for cid, score in ranked if (t := texts.get(cid)) is not None]

    # -- embedding clients ---------------------------------------------------------------------

    def _search_client(self, kb: KnowledgeBase) -> EmbeddingClient:
        """A search waits for its answer: one retry, like a chat model's default."""
        return self._client(kb, RetryPolicy(max_retries=1, sleep=self._sleep))

    def _ingest_client(self, kb: KnowledgeBase) -> EmbeddingClient:
        """Indexing can wait: more retries, longer backoff (Retry-After honoured)."""
        return self._client(kb, RetryPolicy(
            max_retries=self.settings.knowledge_embed_retries, backoff_s=1.0, max_backoff_s=30.0,
            max_retry_after_s=60.0, sleep=self._sleep))

    def _sleep(self, seconds: float) -> None:
        """``self.sleep`` as it is when a retry waits, not when its client was built: tests
        swap the clock of the engine's own service after ``create_app`` built it."""
        self.sleep(seconds)

    def _client(self, kb: KnowledgeBase, retry: RetryPolicy) -> EmbeddingClient:
        spec = kb.embedding
        key = (spec.base_url, spec.model, spec.dimensions, retry.max_retries)
        with self._clients_lock:
            client = self._clients.get(key)
        if client is None:
            try:
                client = client_for(spec.base_url, spec.model, dimensions=spec.dimensions,
                                    engine_base_url=self.openai_base_url,
                                    api_key=self.openai_api_key, egress=self.egress,
                                    timeout_s=self.settings.knowledge_embed_timeout_s, retry=retry,
                                    aliases=self.model_aliases)
            except ValueError as exc:  # the origin is no longer allowed
                raise ProviderError(f"the embedding endpoint is refused: {exc}") from None
            with self._clients_lock:
                self._clients[key] = client
        return client
