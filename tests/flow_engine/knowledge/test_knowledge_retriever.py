"""The KnowledgeRetriever node in flows: validation knows which bases exist, runs search the
base as it is now, and the node's node_finished event names the documents it found."""

from __future__ import annotations

import json

from kb_harness import create_base, upload_text, wait_document
from support.keys import as_

ECHO = "[echo: not an LLM] "


def _flow(kb: str = "handbook", mode: str = "hybrid") -> dict:
    return {
        "id": "handbook-qa", "name": "Handbook Q&A",
        "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "kb", "type": "KnowledgeRetriever", "params": {"knowledge_id": kb, "k": 1,
                                                                   "mode": mode}},
            {"id": "p", "type": "PromptTemplate",
             "params": {"template": "Context: {context}\nQ: {question}"}},
            {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
            {"id": "out", "type": "ChatOutput"}],
        "edges": [
            {"source": "in", "target": "kb", "target_input": "query"},
            {"source": "in", "target": "p", "target_input": "question"},
            {"source": "kb", "target": "p", "target_input": "context"},
            {"source": "p", "target": "llm"}, {"source": "llm", "target": "out"}]}


def test_a_flow_naming_a_base_that_does_not_exist_is_invalid(api) -> None:
    resp = api.post("/api/v1/flows", headers=as_("editor"), json=_flow("nope"))
    assert resp.status_code == 422
    problem = resp.get_json()["error"]["problems"][0]
    assert problem["path"] == "$.nodes[1].params.knowledge_id"
    assert "no knowledge base with id or name 'nope'" in problem["message"]
    bad = api.post("/api/v1/flows/validate", headers=as_("editor"),
                   json={**_flow(), "nodes": [*_flow()["nodes"][:1], {
                       "id": "kb", "type": "KnowledgeRetriever",
                       "params": {"knowledge_id": "handbook", "k": 0, "mode": "telepathy"}},
                       *_flow()["nodes"][2:]]})
    paths = sorted(p["path"] for p in bad.get_json()["error"]["problems"])
    assert paths == ["$.nodes[1].params.k", "$.nodes[1].params.knowledge_id",
                     "$.nodes[1].params.mode"]


def test_a_run_retrieves_from_the_base_and_names_the_documents(api) -> None:
    create_base(api)
    upload_text(api, "handbook", "refunds.md", "Refunds are issued within 5 business days.")
    upload_text(api, "handbook", "shipping.md", "Shipping is free for orders over 50 EUR.")
    for name in ("refunds.md", "shipping.md"):
        wait_document(api, "handbook", name)
    assert api.post("/api/v1/flows", headers=as_("editor"), json=_flow()).status_code == 201
    resp = api.post("/api/v1/run/handbook-qa?stream=true", headers=as_("runner"),
                    json={"input_value": "How long do refunds take?"})
    events = [json.loads(line[6:]) for line in resp.get_data(as_text=True).splitlines()
              if line.startswith("data: ")]
    finished = next(e for e in events if e.get("node") == "kb" and "output" in e)
    assert finished["node_type"] == "KnowledgeRetriever"
    [found] = finished["output"]
    assert found["metadata"]["document"] == "refunds.md"
    assert found["metadata"]["knowledge_id"] == "handbook" and found["metadata"]["chunk"] == 0
    result = events[-1]
    assert result["output"] == (f"{ECHO}Context: Refunds are issued within 5 business days.\n"
                                "Q: How long do refunds take?")


def test_a_compiled_flow_sees_documents_added_later(api) -> None:
    create_base(api)
    assert api.post("/api/v1/flows", headers=as_("editor"), json=_flow(mode="keyword")).status_code == 201
    run = lambda: api.post("/api/v1/run/handbook-qa", headers=as_("runner"),  # noqa: E731
                           json={"input_value": "gift cards"}).get_json()["output"]
    assert run() == f"{ECHO}Context: \nQ: gift cards"
    upload_text(api, "handbook", "gifts.md", "Gift cards never expire.")
    wait_document(api, "handbook", "gifts.md")
    assert run() == f"{ECHO}Context: Gift cards never expire.\nQ: gift cards"


def test_a_deleted_base_fails_the_run_clearly(api) -> None:
    create_base(api)
    assert api.post("/api/v1/flows", headers=as_("editor"), json=_flow(mode="keyword")).status_code == 201
    assert api.delete("/api/v1/knowledge/handbook", headers=as_("admin")).status_code == 204
    resp = api.post("/api/v1/run/handbook-qa", headers=as_("runner"), json={"input_value": "x"})
    assert resp.status_code in (422, 502), resp.get_data(as_text=True)
    assert "handbook" in resp.get_json()["error"]["message"]


def test_the_component_is_listed(api) -> None:
    components = api.get("/api/v1/components", headers=as_("runner")).get_json()["components"]
    entry = next(c for c in components if c["type"] == "KnowledgeRetriever")
    assert entry["outputs"] == ["documents"] and entry["inputs"][0]["name"] == "query"
    assert entry["params_schema"]["required"] == ["knowledge_id"]
