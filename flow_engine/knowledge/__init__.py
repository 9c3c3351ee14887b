"""Knowledge bases (GitHub issue #16): upload documents, embed them, search them by meaning
and keywords from the API and from any flow (the KnowledgeRetriever node).

    api/knowledge.py ─▶ service.py ─▶ store.py (bases, documents, the indexing queue: SQL)
                          │   │          └─▶ sqlite_index.py (numpy exact + FTS5)
                          │   │              pg_index.py     (pgvector HNSW + tsvector)
                          │   └─▶ ingest.py (background: parse.py → split → embeddings.py → swap)
                          └─▶ fusion.py (keyword terms, reciprocal rank fusion)
    model.py  what a base, a document and a hit are; request checks (pure)
    schema.py the tables; ``ensure`` is the migration (idempotent)
    settings.py, errors.py

Read service.py first: availability (FLOW_ENGINE_KNOWLEDGE), tenancy, how the pieces meet.
"""
