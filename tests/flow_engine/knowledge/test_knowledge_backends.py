"""The two backends side by side: the same corpus and queries give the same top hits on
SQLite (exact numpy, FTS5) and PostgreSQL (pgvector HNSW, tsvector); and what happens on a
PostgreSQL without pgvector (the shared server of the test machine has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kb_harness import (
    FakeSleep,
    close_app,
    create_base,
    engine_app,
    knowledge_service,
    search,
    upload_text,
    wait_document,
)
from support.keys import as_

from flow_engine.knowledge import schema
from flow_engine.knowledge.service import KnowledgeConfigError

CORPUS = {
    "refunds.md": "Refunds are issued within five business days after we receive the item.",
    "shipping.md": "Shipping is free for orders over fifty euros; parcels arrive in three days.",
    "holidays.md": "Employees get twenty eight days of paid holiday every year.",
    "security.md": "Passwords must be rotated every ninety days and never shared by email.",
    "expenses.md": "Travel expenses are reimbursed within one month with receipts attached.",
    "onboarding.md": "New hires receive a laptop and a badge on their first morning.",
    "support.md": "The support desk answers tickets from Monday to Friday, nine to five.",
    "gifts.md": "Gift cards never expire and can be used for any product in the shop.",
}
QUERIES = ["how long do refunds take", "free shipping parcels", "paid holiday days per year",
           "rotate passwords", "reimbursed travel receipts", "laptop for new hires",
           "support desk opening hours", "do gift cards expire"]


def _indexed(app) -> object:
    api = app.test_client()
    create_base(api)
    for name, text in CORPUS.items():
        upload_text(api, "handbook", name, text)
    for name in CORPUS:
        assert wait_document(api, "handbook", name)["status"] == "ready"
    return api


def _app(url: str, llm_sim, **config):
    return engine_app(url, llm_sim.base_url, sleep=FakeSleep(), **config)


@pytest.fixture
def both(tmp_path: Path, vector_pg_url: str, llm_sim):
    apps = [_app(f"sqlite:///{tmp_path / 'kb.db'}", llm_sim), _app(vector_pg_url, llm_sim)]
    yield apps
    for app in apps:
        close_app(app)


def test_the_same_corpus_gives_the_same_top_hits_on_both_backends(both) -> None:
    sqlite_api, pg_api = (_indexed(app) for app in both)
    for query in QUERIES:
        for mode in ("vector", "keyword", "hybrid"):
            a = search(sqlite_api, "handbook", query, k=3, mode=mode)
            b = search(pg_api, "handbook", query, k=3, mode=mode)
            assert a[0]["document"] == b[0]["document"], (query, mode, a, b)
            if mode == "vector":  # the same cosine scores, so the same order
                assert [h["document"] for h in a] == [h["document"] for h in b], (query, a, b)
                assert [h["score"] for h in a] == pytest.approx([h["score"] for h in b], abs=1e-4)
        expected = QUERIES.index(query)
        assert search(sqlite_api, "handbook", query, k=1)[0]["document"] == list(CORPUS)[expected]


def test_without_pgvector_knowledge_is_unavailable_and_says_why(postgres_url: str, llm_sim) -> None:
    app = _app(postgres_url, llm_sim)  # FLOW_ENGINE_KNOWLEDGE=auto: the engine runs
    try:
        api = app.test_client()
        resp = api.get("/api/v1/knowledge", headers=as_("runner"))
        assert resp.status_code == 503
        error = resp.get_json()["error"]
        assert error["code"] == "knowledge_unavailable" and "'vector' extension" in error["message"]
        flow = {"id": "f", "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "kb", "type": "KnowledgeRetriever", "params": {"knowledge_id": "handbook"}},
            {"id": "out", "type": "ChatOutput"}],
            "edges": [{"source": "in", "target": "kb"}, {"source": "kb", "target": "out"}]}
        invalid = api.post("/api/v1/flows", headers=as_("editor"), json=flow)
        assert invalid.status_code == 422
        assert "pgvector" in invalid.get_json()["error"]["problems"][0]["message"]
        plain = {"id": "g", "nodes": [{"id": "in", "type": "ChatInput"},
                                      {"id": "out", "type": "ChatOutput"}],
                 "edges": [{"source": "in", "target": "out"}]}
        assert api.post("/api/v1/flows", headers=as_("editor"), json=plain).status_code == 201
        assert api.post("/api/v1/run/g", headers=as_("runner"),
                        json={"input_value": "hi"}).get_json()["output"] == "hi"
    finally:
        close_app(app)
    with pytest.raises(KnowledgeConfigError, match=r"FLOW_ENGINE_KNOWLEDGE=on: .*'vector' extension"):
        _app(postgres_url, llm_sim, knowledge="on")


def test_knowledge_off_answers_503_and_indexes_nothing(tmp_path: Path, llm_sim) -> None:
    app = _app(f"sqlite:///{tmp_path / 'off.db'}", llm_sim, knowledge="off")
    service = knowledge_service(app)
    resp = app.test_client().get("/api/v1/knowledge", headers=as_("runner"))
    assert resp.status_code == 503 and "FLOW_ENGINE_KNOWLEDGE=off" in resp.get_json()["error"]["message"]
    upload = app.test_client().post("/api/v1/knowledge/kb/documents", headers=as_("editor"),
                                    json={"name": "a.md", "text": "x"})
    assert upload.status_code == 503 and service.ingestor.idle()
    close_app(app)


def test_the_migration_is_idempotent(kb_database: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(kb_database.replace("postgresql://", "postgresql+psycopg://"))
    try:
        for _ in range(2):
            with engine.begin() as conn:
                assert schema.ensure(conn) is None
        with engine.connect() as conn:
            assert schema.problem(conn) is None
    finally:
        engine.dispose()
