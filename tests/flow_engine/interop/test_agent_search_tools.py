"""Search tools inside an Agent, through the engine's API on the real llm-sim: a
``BM25SearchTool`` over documents in its params, and a ``KnowledgeSearchTool`` over a
knowledge base created and filled through ``/api/v1/knowledge`` (the engine's default
SQLite index, llm-sim embeddings). llm-sim's tool rule (flowgate/llm_sim.py) makes the
model call the only tool with the user's message as its ``query``, then quote the result."""

from __future__ import annotations

import json
from typing import Any

import requests
import sseclient
from support.keys import as_
from support.waiting import wait_until

WAIT_S = 30.0
DOCUMENTS = ["Refunds take 5 days.", "Shipping is free.", "Refunds need a receipt."]
EMBEDDING = {"provider": "openai", "model": "flowgate-sim-embedding", "dimensions": 64}


def agent_with(tool: dict[str, Any]) -> dict[str, Any]:
    return {"id": "search-agent", "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "search", **tool},
        {"id": "agent", "type": "Agent", "params": {
            "model": "flowgate-sim", "tools": ["search"], "system_prompt": "Look it up."}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "agent", "target_input": "input"},
                  {"source": "search", "target": "agent", "target_input": "tools.search"},
                  {"source": "agent", "target": "out"}]}


def create(client: Any, definition: dict[str, Any]) -> Any:
    return client.post("/api/v1/flows", headers=as_("editor"), json=definition)


def streamed(client: Any, text: str) -> list[tuple[str, dict[str, Any]]]:
    resp = client.post("/api/v1/run/search-agent?stream=true", headers=as_("runner"),
                       json={"input_value": text})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [(e.event, json.loads(e.data)) for e in sseclient.SSEClient(resp.iter_encoded()).events()]


def tool_messages(sim: Any) -> list[str]:
    return [m["content"] for r in sim.requests() for m in r["body"]["messages"]
            if m["role"] == "tool"]


def test_an_agent_searches_documents_with_bm25(engine_client, fresh_llm_sim) -> None:
    tool = {"type": "BM25SearchTool", "params": {"documents": DOCUMENTS, "k": 2}}
    assert create(engine_client, agent_with(tool)).status_code == 201

    events = streamed(engine_client, "How do refunds work?")

    found = "[1] Refunds take 5 days.\n\n[2] Refunds need a receipt."
    assert tool_messages(fresh_llm_sim) == [found]
    first = fresh_llm_sim.requests()[0]["body"]
    assert [t["function"]["name"] for t in first["tools"]] == ["search"]
    call = next(d for k, d in events if k == "tool_call")
    result = next(d for k, d in events if k == "tool_result")
    assert (call["node"], call["tool"], call["args"]) == (
        "agent", "search", {"query": "How do refunds work?"})
    assert (result["status"], result["output"]) == ("success", found)
    assert events[-1][0] == "run_finished"
    assert events[-1][1]["output"].startswith('[simulated reply] search: "[1] Refunds take 5')


def test_bm25_that_finds_nothing_says_so_to_the_model(engine_client, fresh_llm_sim) -> None:
    tool = {"type": "BM25SearchTool", "params": {"documents": DOCUMENTS}}
    assert create(engine_client, agent_with(tool)).status_code == 201

    events = streamed(engine_client, "zebra")

    assert tool_messages(fresh_llm_sim) == ["nothing found"]
    assert events[-1][1]["output"].startswith('[simulated reply] search: "nothing found"')


def knowledge_base(client: Any, llm_sim: Any) -> None:
    """The base ``handbook`` with two documents, both indexed."""
    resp = client.post("/api/v1/knowledge", headers=as_("editor"),
                       json={"id": "handbook", "name": "handbook", "embedding": EMBEDDING})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    for name, text in [("refunds.md", "Refunds take five business days after we receive "
                                      "the parcel."),
                       ("shipping.md", "Shipping is free for orders above fifty euros.")]:
        resp = client.post("/api/v1/knowledge/handbook/documents", headers=as_("editor"),
                           json={"name": name, "text": text})
        assert resp.status_code == 202, resp.get_data(as_text=True)
        doc = resp.get_json()["id"]

        def ready(doc: str = doc) -> bool:
            body = client.get(f"/api/v1/knowledge/handbook/documents/{doc}",
                              headers=as_("runner")).get_json()
            assert body["status"] != "failed", body
            return body["status"] == "ready"

        wait_until(ready, f"document {name} to be indexed", WAIT_S)


def embeddings_requests(llm_sim: Any) -> list[dict[str, Any]]:
    return requests.get(llm_sim.url + "/sim/embedding-requests", timeout=10).json()


def test_an_agent_searches_a_knowledge_base(engine_client, fresh_llm_sim) -> None:
    knowledge_base(engine_client, fresh_llm_sim)
    tool = {"type": "KnowledgeSearchTool", "params": {
        "knowledge_id": "handbook", "k": 1, "name": "handbook",
        "description": "Searches the company handbook."}}
    assert create(engine_client, agent_with(tool)).status_code == 201
    indexed = len(embeddings_requests(fresh_llm_sim))

    events = streamed(engine_client, "How many days do refunds take?")

    passage = "[1] Refunds take five business days after we receive the parcel."
    assert tool_messages(fresh_llm_sim) == [passage]
    first = fresh_llm_sim.requests()[0]["body"]
    assert first["tools"][0]["function"]["name"] == "handbook"
    assert first["tools"][0]["function"]["description"] == "Searches the company handbook."
    # searched by meaning too: the query was embedded by the base's model
    [query] = embeddings_requests(fresh_llm_sim)[indexed:]
    assert (query["model"], query["inputs"]) == ("flowgate-sim-embedding", 1)
    result = next(d for k, d in events if k == "tool_result")
    assert (result["node"], result["tool"], result["output"]) == ("agent", "handbook", passage)
    assert events[-1][1]["output"].startswith('[simulated reply] handbook: "[1] Refunds take')


def test_a_knowledge_tool_naming_no_base_is_refused_at_its_path(engine_client) -> None:
    tool = {"type": "KnowledgeSearchTool", "params": {"knowledge_id": "no-such-base"}}

    resp = create(engine_client, agent_with(tool))

    assert resp.status_code == 422
    paths = [p["path"] for p in resp.get_json()["error"]["problems"]]
    assert paths == ["$.nodes[1].params.knowledge_id"]
