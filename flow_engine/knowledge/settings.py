"""The knowledge settings, read from the engine's :class:`~flow_engine.config.Settings`.

Each field here is also a field of ``Settings`` (so it has an environment name,
``FLOW_ENGINE_<FIELD>``, e.g. ``FLOW_ENGINE_MAX_UPLOAD_BYTES``); :meth:`from_settings` copies
those that are present and keeps these defaults for the others, so the package also works
with a ``Settings`` that predates it (and tests can override any field).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class KnowledgeSettings:
    # auto: on when the database can hold vectors, else off with a warning naming what is
    # missing (and 503 on the knowledge routes); on: refuse to start without it; off: no
    # knowledge bases at all.
    knowledge: str = "auto"
    max_upload_bytes: int = 20 * 1024 * 1024  # one uploaded document (413 above)
    knowledge_ingest_concurrency: int = 2  # documents indexed at once per engine process
    knowledge_embed_batch: int = 64  # texts per embeddings request
    knowledge_embed_retries: int = 4  # retries of one failed embeddings request
    knowledge_embed_timeout_s: float = 60.0  # connect, and then read, per request
    knowledge_max_chunks: int = 20_000  # chunks of one document (bounds memory and cost)
    knowledge_max_pdf_pages: int = 2_000
    knowledge_max_pdf_objects: int = 200_000
    # PostgreSQL: HNSW candidates per search (recall). bench/knowledge.py at 100k chunks:
    # 100 → recall@10 0.86 (p50 4.5 ms), 200 → 0.94 (6.5 ms), 400 → 0.98 (11 ms)
    knowledge_hnsw_ef_search: int = 400
    knowledge_stale_s: float = 30.0  # an indexing document whose engine was silent this long
    knowledge_max_attempts: int = 3  # is re-queued, up to this many times, then failed
    knowledge_cache_bytes: int = 512 * 1024 * 1024  # SQLite: vectors kept in memory

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> KnowledgeSettings:
        values = {f.name: getattr(settings, f.name) for f in fields(cls)
                  if hasattr(settings, f.name)}
        return replace(cls(), **{**values, **overrides}).checked()

    def checked(self) -> KnowledgeSettings:
        if self.knowledge not in MODES:
            raise ValueError(f"FLOW_ENGINE_KNOWLEDGE must be one of {', '.join(MODES)}, "
                             f"got {self.knowledge!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "knowledge" and (isinstance(value, bool) or value <= 0):
                raise ValueError(f"FLOW_ENGINE_{f.name.upper()} must be positive, got {value!r}")
        return self
