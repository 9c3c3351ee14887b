"""What a knowledge base, a document and a search hit are, and the checks of the request
bodies that create and search them. Pure: no Flask, SQL or network.

Every check reports all problems at once, each with a JSON path
(``$.embedding.dimensions: must be an integer in [1, 4000]``), like flow validation.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from flow_engine.egress import ProviderOrigins
from flow_engine.errors import Problem
from flow_engine.knowledge.errors import KnowledgeInvalid
from flow_engine.knowledge.vocab import ID_RE, MODES

PROVIDERS = ("openai",)  # any OpenAI-compatible /v1/embeddings endpoint
MAX_DIMENSIONS = 4000  # pgvector indexes halfvec up to 4000 dimensions
METADATA_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_METADATA_KEYS, MAX_METADATA_VALUE = 32, 1000


@dataclass(frozen=True)
class EmbeddingSpec:
    provider: str
    model: str
    dimensions: int | None = None  # None: whatever the model returns
    base_url: str | None = None  # None: the engine's OPENAI_BASE_URL

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"provider": self.provider, "model": self.model,
                               "dimensions": self.dimensions}
        if self.base_url:
            out["base_url"] = self.base_url
        return out


@dataclass(frozen=True)
class Chunking:
    size: int = 1000
    overlap: int = 200

    def as_dict(self) -> dict[str, int]:
        return {"size": self.size, "overlap": self.overlap}


@dataclass(frozen=True)
class KnowledgeBase:
    id: str
    name: str
    embedding: EmbeddingSpec
    chunking: Chunking
    dimensions: int | None  # known once the first document was embedded (or given)
    generation: int  # bumped by every change of its chunks
    created_at: datetime
    updated_at: datetime
    created_by: str | None = None


@dataclass(frozen=True)
class DocumentRecord:
    kb_id: str
    id: str
    name: str
    status: str  # of the latest upload: queued | indexing | ready | failed
    chunks: int  # chunks searches see now (an earlier upload's while a new one indexes)
    error: str | None
    content_type: str
    bytes: int
    sha256: str
    metadata: dict[str, Any]
    version: int  # uploads of this name so far
    live_version: int | None  # the upload whose chunks searches see
    attempts: int
    created_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "knowledge_id": self.kb_id, "name": self.name, "status": self.status,
            "chunks": self.chunks, "content_type": self.content_type, "bytes": self.bytes,
            "sha256": self.sha256, "metadata": self.metadata, "version": self.version,
            "live_version": self.live_version,
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat()}
        if self.error:
            body["error"] = self.error
        return body


@dataclass(frozen=True)
class Hit:
    document_id: str
    document: str  # the document's name
    chunk: int
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"document": self.document, "document_id": self.document_id, "chunk": self.chunk,
                "text": self.text, "score": self.score, "metadata": self.metadata}


@dataclass(frozen=True)
class ChunkRow:
    """A chunk on its way into the index."""

    chunk: int
    text: str
    metadata: dict[str, Any]
    vector: np.ndarray  # float32, unit length


@dataclass(frozen=True)
class SearchRequest:
    query: str
    k: int = 4
    mode: str = "hybrid"
    metadata: dict[str, Any] = field(default_factory=dict)  # exact matches, all of them


@dataclass(frozen=True)
class NewBase:
    id: str
    name: str
    embedding: EmbeddingSpec
    chunking: Chunking


def parse_create(body: Any, egress: ProviderOrigins | None) -> NewBase:
    """``{id?, name, embedding: {provider, model, dimensions?, base_url?}, chunking?: {size,
    overlap}}``; ``egress`` (None offline) decides which ``base_url`` origins are allowed."""
    problems: list[Problem] = []
    add = lambda path, msg: problems.append(Problem(path, msg))  # noqa: E731
    if not isinstance(body, dict):
        raise KnowledgeInvalid([Problem("$", "the body must be a JSON object")])
    _unknown(body, {"id", "name", "embedding", "chunking"}, "$", add)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or _CONTROL.search(name):
        add("$.name", "name must be 1-200 characters without control characters")
    kb_id = body.get("id")
    if kb_id is None and isinstance(name, str):
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48]
        kb_id = f"{slug or 'kb'}-{secrets.token_hex(4)}"
    elif not isinstance(kb_id, str) or not ID_RE.fullmatch(kb_id):
        add("$.id", "id must be 1-64 characters of letters, digits, '_', '.', '-'")
    spec = _embedding(body.get("embedding"), egress, add)
    chunking = _chunking(body.get("chunking", {}), add)
    if problems:
        raise KnowledgeInvalid(problems)
    return NewBase(kb_id, name.strip(), spec, chunking)


def _embedding(raw: Any, egress: ProviderOrigins | None, add) -> EmbeddingSpec | None:
    if not isinstance(raw, dict):
        add("$.embedding", 'embedding must be an object like {"provider": "openai", '
            '"model": "text-embedding-3-small"}')
        return None
    _unknown(raw, {"provider", "model", "dimensions", "base_url"}, "$.embedding", add)
    provider = raw.get("provider", "openai")
    if provider not in PROVIDERS:
        add("$.embedding.provider", f"provider must be one of {', '.join(PROVIDERS)} (any "
            "OpenAI-compatible /v1/embeddings endpoint)")
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 200:
        add("$.embedding.model", "model must be a name of 1-200 characters")
    dims = raw.get("dimensions")
    if dims is not None and (not _is_int(dims) or not 1 <= dims <= MAX_DIMENSIONS):
        add("$.embedding.dimensions", f"dimensions must be an integer in [1, {MAX_DIMENSIONS}]")
    base_url = raw.get("base_url")
    if base_url is not None:
        if not isinstance(base_url, str) or len(base_url) > 2000:
            add("$.embedding.base_url", "base_url must be an http(s) URL")
        elif egress is not None and (problem := egress.problem(base_url)):
            add("$.embedding.base_url", problem)
    return EmbeddingSpec(provider, model, dims, base_url) if isinstance(model, str) else None


def _chunking(raw: Any, add) -> Chunking:
    if not isinstance(raw, dict):
        add("$.chunking", 'chunking must be an object like {"size": 1000, "overlap": 200}')
        return Chunking()
    _unknown(raw, {"size", "overlap"}, "$.chunking", add)
    size, overlap = raw.get("size", Chunking.size), raw.get("overlap", Chunking.overlap)
    if not _is_int(size) or not 100 <= size <= 8000:
        add("$.chunking.size", "size must be an integer in [100, 8000] (characters)")
        size = None
    if not _is_int(overlap) or overlap < 0 or (size is not None and overlap >= size):
        add("$.chunking.overlap", "overlap must be an integer >= 0 and smaller than size")
    return Chunking(size, overlap) if size is not None else Chunking()


def parse_search(body: Any) -> SearchRequest:
    """``{query, k?, mode?, filter?: {metadata: {key: value}}}``."""
    problems: list[Problem] = []
    add = lambda path, msg: problems.append(Problem(path, msg))  # noqa: E731
    if not isinstance(body, dict):
        raise KnowledgeInvalid([Problem("$", "the body must be a JSON object")])
    _unknown(body, {"query", "k", "mode", "filter"}, "$", add)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip() or len(query) > 4000:
        add("$.query", "query must be 1-4000 characters of text")
    k = body.get("k", 4)
    if not _is_int(k) or not 1 <= k <= 100:
        add("$.k", "k must be an integer in [1, 100]")
    mode = body.get("mode", "hybrid")
    if mode not in MODES:
        add("$.mode", f"mode must be one of {', '.join(MODES)}")
    metadata: dict[str, Any] = {}
    raw_filter = body.get("filter")
    if raw_filter is not None:
        if not isinstance(raw_filter, dict):
            add("$.filter", 'filter must be an object like {"metadata": {"team": "support"}}')
        else:
            _unknown(raw_filter, {"metadata"}, "$.filter", add)
            metadata = parse_metadata(raw_filter.get("metadata", {}), "$.filter.metadata", add)
    if problems:
        raise KnowledgeInvalid(problems)
    return SearchRequest(query.strip(), k, mode, metadata)


def parse_metadata(raw: Any, path: str, add) -> dict[str, Any]:
    """A flat object of at most 32 keys (``[A-Za-z0-9_.-]``, 1-64 characters) whose values
    are strings (≤ 1000 characters), finite numbers or booleans: what filters match on."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        add(path, "metadata must be an object of key: string, number or boolean")
        return {}
    if len(raw) > MAX_METADATA_KEYS:
        add(path, f"metadata has {len(raw)} keys; at most {MAX_METADATA_KEYS}")
        return {}
    out = {}
    for key, value in raw.items():
        where = f"{path}.{key[:64]}"
        if not METADATA_KEY.fullmatch(key):
            add(path, f"metadata key {key[:64]!r} must be 1-64 letters, digits, '_', '.', '-'")
        elif _scalar(value):
            out[key] = value
        else:
            add(where, f"a metadata value must be a string of at most {MAX_METADATA_VALUE} "
                "characters, a finite number or a boolean")
    return out


def document_name(raw: Any) -> str | None:
    """The name a document is stored under: the last path component of what the client
    sent (a name never becomes a path: files are not written to disk), stripped; None when
    it is empty, too long or holds control characters."""
    if not isinstance(raw, str):
        return None
    name = re.split(r"[/\\]", raw)[-1].strip()
    if not name or name in (".", "..") or len(name) > 200 or _CONTROL.search(name):
        return None
    return name


def _scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_METADATA_VALUE
    return isinstance(value, bool) or (isinstance(value, int | float) and math.isfinite(value))


def _unknown(raw: dict, known: set[str], path: str, add) -> None:
    for key in raw:
        if key not in known:
            add(f"{path}.{str(key)[:64]}", f"unknown key (allowed: {', '.join(sorted(known))})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
