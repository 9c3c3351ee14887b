"""The knowledge API end to end on each backend: create a base, upload documents (JSON and
multipart), watch them index through llm-sim's embeddings, search them three ways, filter,
replace and delete."""

from __future__ import annotations

from kb_harness import EMBEDDING, create_base, search, upload_text, wait_document
from support.keys import as_

REFUNDS = ("Refunds are issued within 5 business days of receiving the returned item. "
           "A refund goes back to the card you paid with.")
SHIPPING = ("Shipping is free for orders over 50 EUR; otherwise it costs 4.90 EUR. "
            "Parcels travel with DHL and arrive within three days.")
HOLIDAYS = ("Every employee has 28 days of paid holiday a year. Ask your manager before "
            "booking more than two weeks in a row.")


def _corpus(api) -> None:
    create_base(api)
    for name, text, team in (("refunds.md", REFUNDS, "support"), ("shipping.md", SHIPPING, "support"),
                             ("holidays.md", HOLIDAYS, "people")):
        doc = upload_text(api, "handbook", name, text, team=team)
        # the indexer may have claimed it before the answer was written
        assert doc["status"] in ("queued", "indexing") and doc["name"] == name
    for name in ("refunds.md", "shipping.md", "holidays.md"):
        assert wait_document(api, "handbook", name)["status"] == "ready"


def test_create_get_and_list_a_base(api, editor) -> None:
    created = create_base(api, "policies", name="Company policies",
                          chunking={"size": 500, "overlap": 50})
    assert created["embedding"] == EMBEDDING and created["chunking"] == {"size": 500, "overlap": 50}
    assert created["status"] == "empty" and created["chunks"] == 0
    got = api.get("/api/v1/knowledge/Company policies", headers=as_("runner")).get_json()
    assert got["id"] == "policies" and got["created_by"] == "designer"
    listed = api.get("/api/v1/knowledge", headers=as_("runner")).get_json()["knowledge"]
    assert [kb["id"] for kb in listed] == ["policies"]
    again = api.post("/api/v1/knowledge", headers=editor,
                     json={"id": "policies", "name": "x", "embedding": EMBEDDING})
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "conflict"


def test_documents_index_and_search_finds_them_by_meaning_and_words(api) -> None:
    _corpus(api)
    kb = api.get("/api/v1/knowledge/handbook", headers=as_("runner")).get_json()
    assert kb["status"] == "ready" and kb["documents"]["ready"] == 3 and kb["chunks"] == 3
    assert kb["dimensions"] == 128
    for mode in ("vector", "keyword", "hybrid"):
        hits = search(api, "handbook", "How long until I get my refund?", k=2, mode=mode)
        assert hits[0]["document"] == "refunds.md", (mode, hits)
        assert hits[0]["metadata"] == {"team": "support"} and hits[0]["chunk"] == 0
        assert hits[0]["text"] == REFUNDS
    vector = search(api, "handbook", "paid holiday days", k=3, mode="vector")
    assert vector[0]["document"] == "holidays.md"
    assert vector[0]["score"] > vector[1]["score"]


def test_a_metadata_filter_keeps_only_matching_documents(api) -> None:
    _corpus(api)
    for mode in ("vector", "keyword", "hybrid"):
        hits = search(api, "handbook", "days", k=3, mode=mode,
                      filter={"metadata": {"team": "people"}})
        assert [h["document"] for h in hits] == ["holidays.md"], mode
    none = search(api, "handbook", "days", mode="hybrid", filter={"metadata": {"team": "ops"}})
    assert none == []


def test_multipart_upload_of_markdown_html_and_pdf(api, pdf) -> None:
    create_base(api)
    files = {
        "faq.md": (b"# FAQ\n\nGift cards never expire.", "text/markdown"),
        "page.html": (b"<html><body><h1>Opening hours</h1><p>Monday to Friday</p>"
                      b"<script>var secret = 'zebra';</script></body></html>", "text/html"),
        "manual.pdf": (pdf(["Warranty lasts two years", "Batteries are excluded"]),
                       "application/pdf"),
    }
    for name, (data, ctype) in files.items():
        resp = api.post("/api/v1/knowledge/handbook/documents", headers=as_("editor"),
                        data={"file": (_io(data), name, ctype), "metadata": '{"source": "web"}'},
                        content_type="multipart/form-data")
        assert resp.status_code == 202, resp.get_data(as_text=True)
        assert resp.headers["Location"].endswith(resp.get_json()["id"])
    for name in files:
        doc = wait_document(api, "handbook", name)
        assert doc["status"] == "ready", doc
        assert doc["metadata"] == {"source": "web"}
    assert search(api, "handbook", "warranty years", mode="keyword")[0]["document"] == "manual.pdf"
    assert search(api, "handbook", "batteries", mode="keyword")[0]["text"].endswith("excluded")
    assert search(api, "handbook", "opening hours", mode="keyword")[0]["document"] == "page.html"
    assert search(api, "handbook", "zebra secret", mode="keyword") == []  # scripts are not text


def test_uploading_a_name_again_replaces_the_document(api) -> None:
    create_base(api)
    first = upload_text(api, "handbook", "refunds.md", REFUNDS)
    wait_document(api, "handbook", "refunds.md")
    second = upload_text(api, "handbook", "refunds.md", "Refunds now take ten weeks.")
    assert second["id"] == first["id"] and second["version"] == 2
    done = wait_document(api, "handbook", "refunds.md")
    assert done["status"] == "ready" and done["live_version"] == 2 and done["chunks"] == 1
    hits = search(api, "handbook", "refunds", mode="keyword", k=10)
    assert [h["text"] for h in hits] == ["Refunds now take ten weeks."]


def test_delete_a_document_and_a_base(api) -> None:
    _corpus(api)
    doc = api.get("/api/v1/knowledge/handbook/documents/refunds.md", headers=as_("runner")).get_json()
    resp = api.delete(f"/api/v1/knowledge/handbook/documents/{doc['id']}", headers=as_("editor"))
    assert resp.status_code == 204
    assert all(h["document"] != "refunds.md"
               for h in search(api, "handbook", "refund", k=10, mode="hybrid"))
    gone = api.get(f"/api/v1/knowledge/handbook/documents/{doc['id']}", headers=as_("runner"))
    assert gone.status_code == 404 and gone.get_json()["error"]["code"] == "document_not_found"
    assert api.delete("/api/v1/knowledge/handbook", headers=as_("admin")).status_code == 204
    missing = api.post("/api/v1/knowledge/handbook/search", headers=as_("runner"),
                       json={"query": "refund"})
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "knowledge_not_found"
    assert missing.get_json()["error"]["trace_id"]


def test_list_documents_by_status(api) -> None:
    _corpus(api)
    body = api.get("/api/v1/knowledge/handbook/documents?status=ready", headers=as_("runner")).get_json()
    assert sorted(d["name"] for d in body["documents"]) == ["holidays.md", "refunds.md", "shipping.md"]
    assert api.get("/api/v1/knowledge/handbook/documents?status=failed",
                   headers=as_("runner")).get_json()["documents"] == []


def _io(data: bytes):
    import io

    return io.BytesIO(data)
