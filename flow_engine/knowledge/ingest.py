"""Background indexing in the engine process: parse → split → embed in batches → store.

One :class:`Ingestor` per engine process. Its loop runs only while there is work (it starts
when this process accepts an upload, or at start when the shared queue holds documents):
it claims queued documents (:meth:`KnowledgeStore.claim`, so replicas share the queue)
up to ``knowledge_ingest_concurrency`` at a time, refreshes the heartbeat of those it
indexes, and puts back in the queue documents whose engine went silent
(:meth:`KnowledgeStore.recover`). It exits when no document anywhere is queued or indexing.

Each document is one job in a thread (a greenlet under gevent: embedding requests wait
cooperatively, and the CPU-bound steps — PDF pages, splitting, batches — yield between
pieces so runs keep their latency). A job writes nothing searchable until its last batch is
embedded; then one transaction swaps the chunks in (:meth:`KnowledgeStore.finish_ready`).
Failures become the document's ``error``: the parser's reason, the provider's error after
its retries (with backoff, ``Retry-After`` honoured), a dimension mismatch, a refused
origin. A job whose document was re-uploaded, deleted or taken over stops at its next batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from flow_engine.components.openai_compat import ProviderError
from flow_engine.knowledge import parse
from flow_engine.knowledge.errors import KnowledgeNotFound, ParseError
from flow_engine.knowledge.model import Chunking, ChunkRow, KnowledgeBase
from flow_engine.knowledge.settings import KnowledgeSettings
from flow_engine.knowledge.store import KnowledgeStore
from flow_engine.store.base import StoreError

log = logging.getLogger("flow_engine.knowledge")
SECTION_CHARS = 100_000  # text split per piece, yielding in between


class Ingestor:
    def __init__(self, store: KnowledgeStore, settings: KnowledgeSettings,
                 client_for: Callable[[KnowledgeBase], object], *, poll_s: float = 1.0,
                 owner: str | None = None) -> None:
        self.store = store
        self.settings = settings
        self.client_for = client_for  # (base) -> an EmbeddingClient with ingestion retries
        self.poll_s = poll_s
        self.owner = owner or f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.limits = parse.Limits(settings.knowledge_max_pdf_pages,
                                   settings.knowledge_max_pdf_objects)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._jobs: dict[tuple[str, str], threading.Thread] = {}
        self._beat_at = 0.0

    # -- control ---------------------------------------------------------------------------

    def wake(self) -> None:
        """There may be work: run the loop (start it if it is not running)."""
        with self._lock:
            self._wake.set()
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._loop, name="flowgate-knowledge",
                                                daemon=True)
                self._thread.start()

    def idle(self) -> bool:
        with self._lock:
            return self._thread is None and not self._jobs

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop claiming; give running jobs ``timeout_s``; put the rest back in the queue."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            threads = [t for t in (self._thread, *self._jobs.values()) if t is not None]
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.store.release(self.owner)
        except StoreError:
            log.warning("could not put this process's indexing documents back in the queue; "
                        "they are picked up once their heartbeat is stale")

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                if not self._step():
                    with self._lock:
                        if not self._wake.is_set() or self._stopping.is_set():
                            self._thread = None
                            return
                    continue
            except StoreError:
                log.warning("knowledge indexing: the store is unavailable; retrying")
            except Exception:
                log.exception("knowledge indexing loop failed; retrying")
            self._wake.wait(self.poll_s)
        with self._lock:
            self._thread = None

    def _step(self) -> bool:
        """One round; False when there is nothing left to do anywhere."""
        s = self.store
        s.recover(self.settings.knowledge_stale_s, self.settings.knowledge_max_attempts)
        with self._lock:
            free = self.settings.knowledge_ingest_concurrency - len(self._jobs)
        if free > 0 and not self._stopping.is_set():
            for kb_id, doc_id, version in s.claim(self.owner, free):
                self._start_job(kb_id, doc_id, version)
        with self._lock:
            active = bool(self._jobs)
        if active and time.monotonic() - self._beat_at >= self.settings.knowledge_stale_s / 6:
            s.heartbeat(self.owner)
            self._beat_at = time.monotonic()
        queued, indexing = s.busy()
        return active or queued > 0 or indexing > 0

    def _start_job(self, kb_id: str, doc_id: str, version: int) -> None:
        thread = threading.Thread(target=self._run_job, args=(kb_id, doc_id, version),
                                  name=f"flowgate-index-{doc_id}", daemon=True)
        with self._lock:
            self._jobs[(kb_id, doc_id)] = thread
        thread.start()

    def _run_job(self, kb_id: str, doc_id: str, version: int) -> None:
        try:
            error = self.index_document(kb_id, doc_id, version)
            if error is not None:
                self.store.finish_failed(kb_id, doc_id, version, self.owner, error)
        except Exception:
            log.exception("indexing document %s of knowledge base %s failed", doc_id, kb_id)
            with contextlib.suppress(StoreError):  # else the heartbeat stops: recovery re-queues it
                self.store.finish_failed(kb_id, doc_id, version, self.owner,
                                         "internal error while indexing; the engine's log has "
                                         "the details")
        finally:
            with self._lock:
                self._jobs.pop((kb_id, doc_id), None)
            self._wake.set()

    # -- one document ----------------------------------------------------------------------

    def index_document(self, kb_id: str, doc_id: str, version: int) -> str | None:
        """Index one claimed upload; the reason it failed, or None (done, or no longer ours)."""
        s, owner = self.store, self.owner
        upload = s.load_upload(kb_id, doc_id, version)
        if upload is None:
            return None if not s.still_mine(kb_id, doc_id, version, owner) else \
                "the uploaded bytes are gone; upload the document again"
        try:
            kb = s.get_base(kb_id)
        except KnowledgeNotFound:
            return None  # deleted meanwhile: its documents went with it
        limits = parse.Limits(self.limits.max_pages, self.limits.max_objects,
                              self.settings.knowledge_max_chunks * kb.chunking.size)
        try:
            text = parse.extract(upload.kind, upload.data, limits)
        except ParseError as exc:
            return str(exc)
        pieces = split(text, kb.chunking)
        if len(pieces) > self.settings.knowledge_max_chunks:
            return (f"the document splits into {len(pieces)} chunks; the limit is "
                    f"{self.settings.knowledge_max_chunks}")
        try:
            client = self.client_for(kb)
        except ProviderError as exc:
            return str(exc)
        batches = []
        size = self.settings.knowledge_embed_batch
        for start in range(0, len(pieces), size):
            if self._stopping.is_set() or not s.still_mine(kb_id, doc_id, version, owner):
                return None
            try:
                batches.append(client.embed(pieces[start:start + size]))
            except ProviderError as exc:
                attempts = getattr(exc, "attempts", 1)
                tries = f" (after {attempts} attempts)" if attempts > 1 else ""
                return f"embedding failed{tries}: {exc}"
            time.sleep(0)
        vectors = np.vstack(batches)
        dims = int(vectors.shape[1])
        if kb.dimensions is not None and dims != kb.dimensions:
            return (f"the embedding model returned {dims} dimensions; this knowledge base "
                    f"holds {kb.dimensions}-dimensional vectors")
        if kb.dimensions is None:
            s.prepare(kb_id, dims)  # PostgreSQL: the base's HNSW index, before its first chunks
        rows = [ChunkRow(i, piece, upload.metadata, vectors[i]) for i, piece in enumerate(pieces)]
        s.finish_ready(kb_id, doc_id, version, owner, rows, dims)
        return None


def split(text: str, chunking: Chunking) -> list[str]:
    """The recursive character splitter of the TextSplitter node (paragraphs, lines, words),
    run section by section so that a long document yields to other greenlets."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(chunk_size=chunking.size,
                                              chunk_overlap=chunking.overlap)
    out: list[str] = []
    for section in _sections(text, SECTION_CHARS):
        out += [piece for piece in splitter.split_text(section) if piece.strip()]
        time.sleep(0)
    return out


def _sections(text: str, limit: int):
    while len(text) > limit:
        cut = text.rfind("\n\n", 0, limit)
        cut = cut if cut > limit // 2 else limit
        yield text[:cut]
        text = text[cut:].lstrip("\n")
    if text:
        yield text
