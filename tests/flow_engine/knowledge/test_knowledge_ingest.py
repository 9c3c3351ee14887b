"""Background indexing: failures with their reasons, retries with backoff (the sleep is
faked, recorded), bounded concurrency, atomic replacement while searches run, and recovery
of documents an engine left ``indexing`` when it died."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from kb_harness import EMBEDDING, WAIT_S, create_base, search, upload_text, wait_document
from support.keys import as_
from support.procs import free_port

from flow_engine.api.knowledge import EXTENSION
from flow_engine.knowledge import schema
from flow_engine.knowledge.schema import now

OLD = "Refunds take five business days. Refunds go back to your card."
NEW = "Refunds take ten weeks now, sorry. Refunds come as vouchers."


def _service(app):
    return app.extensions[EXTENSION]


def test_an_embedding_endpoint_that_is_down_fails_the_document_after_retries(make_kapp, fake_sleep) -> None:
    port = free_port()
    api = make_kapp(provider_origins=f"keyless:http://127.0.0.1:{port}").test_client()
    create_base(api, embedding={**EMBEDDING, "base_url": f"http://127.0.0.1:{port}/v1"})
    upload_text(api, "handbook", "refunds.md", OLD)
    doc = wait_document(api, "handbook", "refunds.md")
    assert doc["status"] == "failed" and doc["chunks"] == 0
    assert "could not connect" in doc["error"] and "after 5 attempts" in doc["error"]
    assert len(fake_sleep.delays) == 4 and fake_sleep.delays[0] < fake_sleep.delays[-1]
    assert search(api, "handbook", "refunds", mode="keyword") == []  # nothing half-indexed
    down = api.post("/api/v1/knowledge/handbook/search", headers=as_("runner"),
                    json={"query": "refunds", "mode": "vector"})
    assert down.status_code == 502 and down.get_json()["error"]["code"] == "embedding_failed"


def test_provider_errors_fail_the_document_with_the_status(make_kapp, llm_sim, fake_sleep) -> None:
    llm_sim.restore_defaults()
    api = make_kapp(knowledge_embed_retries=2).test_client()
    create_base(api)
    llm_sim.configure(embedding_error_rate=1, error_kinds=["500"])
    try:
        upload_text(api, "handbook", "refunds.md", OLD)
        doc = wait_document(api, "handbook", "refunds.md")
    finally:
        llm_sim.restore_defaults()
    assert doc["status"] == "failed" and "Error code: 500" in doc["error"]
    assert "after 3 attempts" in doc["error"] and len(fake_sleep.delays) == 2


def test_a_model_that_changes_dimensions_fails_the_new_document(make_kapp, llm_sim) -> None:
    llm_sim.restore_defaults()
    api = make_kapp().test_client()
    create_base(api, embedding={"provider": "openai", "model": "sim"})  # dimensions learned
    upload_text(api, "handbook", "a.md", OLD)
    assert wait_document(api, "handbook", "a.md")["status"] == "ready"
    assert api.get("/api/v1/knowledge/handbook", headers=as_("runner")).get_json()["dimensions"] == 64
    llm_sim.configure(embedding_dim=32)
    try:
        upload_text(api, "handbook", "b.md", NEW)
        doc = wait_document(api, "handbook", "b.md")
    finally:
        llm_sim.restore_defaults()
    assert doc["status"] == "failed"
    assert "returned 32 dimensions; this knowledge base holds 64" in doc["error"]


def test_concurrency_is_bounded_and_a_replacement_is_atomic(make_kapp, llm_sim, fake_sleep) -> None:
    """While the new version of a document is indexing (its embedding request held in a
    retry), searches see exactly the old chunks; after the swap exactly the new ones."""
    llm_sim.restore_defaults()
    api = make_kapp(knowledge_ingest_concurrency=1).test_client()
    create_base(api, chunking={"size": 100, "overlap": 0})
    upload_text(api, "handbook", "refunds.md", OLD)
    wait_document(api, "handbook", "refunds.md")
    old = {h["text"] for h in search(api, "handbook", "refunds", mode="keyword", k=10)}
    assert len(old) == 1

    fake_sleep.hold()
    llm_sim.configure(embedding_error_rate=1, error_kinds=["429"])  # held in its Retry-After
    try:
        upload_text(api, "handbook", "refunds.md", NEW)
        upload_text(api, "handbook", "other.md", "Unrelated text about parcels.")
        assert fake_sleep.waiting.wait(WAIT_S)
        llm_sim.restore_defaults()  # searches embed their queries; the job stays held
        statuses = {d["name"]: d["status"] for d in api.get(
            "/api/v1/knowledge/handbook/documents", headers=as_("runner")).get_json()["documents"]}
        assert statuses == {"refunds.md": "indexing", "other.md": "queued"}  # one at a time
        for mode in ("keyword", "vector", "hybrid"):
            seen = {h["text"] for h in search(api, "handbook", "refunds", mode=mode, k=10)
                    if h["document"] == "refunds.md"}
            assert seen == old, mode
    finally:
        llm_sim.restore_defaults()
        fake_sleep.release()
    observed = []
    while (doc := api.get("/api/v1/knowledge/handbook/documents/refunds.md",
                          headers=as_("runner")).get_json())["status"] != "ready":
        observed.append({h["text"] for h in search(api, "handbook", "refunds", mode="keyword", k=10)})
        assert len(observed) < 5000, doc
    new = {h["text"] for h in search(api, "handbook", "refunds", mode="keyword", k=10)}
    assert new and not new & old
    assert all(texts in (old, new) for texts in observed)  # never both, never neither
    assert wait_document(api, "handbook", "other.md")["status"] == "ready"


def _dead_engine_left(app, name: str, *, attempts: int, silent_s: float) -> str:
    """Leave document ``name`` as an engine that died while indexing it would: claimed by
    that engine, its heartbeat ``silent_s`` old (time is the only thing faked)."""
    store = _service(app).store
    doc = store.put_upload("handbook", name, kind="text", content_type="text/plain",
                           data=OLD.encode(), sha256="0" * 64, metadata={}, actor="test")
    assert store.claim("dead-engine", 10) == [("handbook", doc.id, 1)]
    with store.write() as conn:
        conn.execute(schema.documents.update().where(schema.documents.c.id == doc.id).values(
            attempts=attempts, heartbeat_at=now() - timedelta(seconds=silent_s)))
    return doc.id


def test_a_document_left_indexing_by_a_dead_engine_is_indexed_at_the_next_start(make_kapp) -> None:
    first = make_kapp()
    create_base(first.test_client())
    doc_id = _dead_engine_left(first, "refunds.md", attempts=1, silent_s=3600)
    api = make_kapp().test_client()  # the next start, on the same database
    doc = wait_document(api, "handbook", doc_id)
    assert doc["status"] == "ready" and doc["chunks"] == 1
    assert search(api, "handbook", "refunds", mode="keyword")[0]["document"] == "refunds.md"


def test_a_document_interrupted_too_often_is_failed_with_the_reason(make_kapp) -> None:
    first = make_kapp()
    create_base(first.test_client())
    doc_id = _dead_engine_left(first, "refunds.md", attempts=3, silent_s=3600)
    doc = wait_document(make_kapp().test_client(), "handbook", doc_id)
    assert doc["status"] == "failed" and "interrupted 3 times" in doc["error"]


def test_a_live_engines_document_is_left_alone_until_its_heartbeat_stops(make_kapp) -> None:
    first = make_kapp()
    create_base(first.test_client())
    doc_id = _dead_engine_left(first, "refunds.md", attempts=1, silent_s=0)
    second = make_kapp(knowledge_stale_s=600)
    api = second.test_client()
    store = _service(second).store
    for _ in range(3):  # the loop polls while another engine indexes; it takes nothing
        assert not _service(second).ingestor.idle()
        doc = api.get(f"/api/v1/knowledge/handbook/documents/{doc_id}", headers=as_("runner")).get_json()
        assert doc["status"] == "indexing"
    with store.write() as conn:  # the other engine dies: its heartbeat goes stale
        conn.execute(schema.documents.update().where(schema.documents.c.id == doc_id).values(
            heartbeat_at=now() - timedelta(seconds=3600)))
    assert wait_document(api, "handbook", doc_id)["status"] == "ready"
    assert _wait_idle(_service(second))


def test_closing_puts_unfinished_documents_back_in_the_queue(make_kapp, llm_sim, fake_sleep) -> None:
    llm_sim.restore_defaults()
    app = make_kapp()
    api = app.test_client()
    create_base(api)
    fake_sleep.hold()
    llm_sim.configure(embedding_error_rate=1, error_kinds=["429"])
    try:
        doc = upload_text(api, "handbook", "refunds.md", OLD)
        assert fake_sleep.waiting.wait(WAIT_S)
        _service(app).ingestor.close(timeout_s=0.05)
        store = _service(app).store
        with store.read() as conn:
            row = conn.execute(sa.select(schema.documents.c.status, schema.documents.c.owner)
                               .where(schema.documents.c.id == doc["id"])).one()
        assert tuple(row) == ("queued", None)
    finally:
        llm_sim.restore_defaults()
        fake_sleep.release()
    assert wait_document(make_kapp().test_client(), "handbook", doc["id"])["status"] == "ready"


def _wait_idle(service, timeout_s: float = WAIT_S) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while not service.ingestor.idle():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
