"""``GET /api/v1/flows/{id}/export?format=langflow``: a Flowgate flow in LangFlow's export
shape, without component code, that imports back into a flow answering the same."""

from __future__ import annotations

import json
from typing import Any

from support.keys import as_

CHAT = {"id": "chat", "name": "Chat", "nodes": [
    {"id": "in", "type": "ChatInput"},
    {"id": "p", "type": "ChatPromptTemplate", "params": {"system": "Be brief. {{json}} stays.",
                                                         "human": "{q}"}},
    {"id": "llm", "type": "ChatModel", "params": {"model": "flowgate-sim", "temperature": 0.3}},
    {"id": "parse", "type": "StrOutputParser"},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
              {"source": "llm", "target": "parse"}, {"source": "parse", "target": "out"}]}
AGENT = {"id": "agent", "name": "Agent", "nodes": [
    {"id": "in", "type": "ChatInput"},
    {"id": "hist", "type": "ChatHistory", "params": {"max_messages": 6, "empty_text": ""}},
    {"id": "calc", "type": "Calculator"},
    {"id": "agent", "type": "Agent", "params": {"model": "flowgate-sim", "tools": ["calc"],
                                                "system_prompt": "Compute.", "max_iterations": 4}},
    {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "agent", "target_input": "input"},
              {"source": "hist", "target": "agent", "target_input": "history"},
              {"source": "calc", "target": "agent", "target_input": "tools.calc"},
              {"source": "agent", "target": "out"}]}


def store(client: Any, definition: dict[str, Any]) -> None:
    resp = client.post("/api/v1/flows", headers=as_("editor"), json=definition)
    assert resp.status_code == 201, resp.get_data(as_text=True)


def export(client: Any, flow_id: str, query: str = "") -> dict[str, Any]:
    resp = client.get(f"/api/v1/flows/{flow_id}/export?format=langflow{query}",
                      headers=as_("runner"))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Disposition"] == f'attachment; filename="{flow_id}.json"'
    return resp.get_json()


def answer(client: Any, flow_id: str, text: str) -> str:
    resp = client.post(f"/api/v1/run/{flow_id}", headers=as_("runner"), json={"input_value": text})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["output"]


def test_the_export_is_langflows_shape_without_code(engine_client) -> None:
    store(engine_client, CHAT)

    data = export(engine_client, "chat")

    assert (data["name"], data["is_component"]) == ("Chat", False)
    nodes = {n["id"]: n for n in data["data"]["nodes"]}
    assert {n["data"]["type"] for n in nodes.values()} == {
        "ChatInput", "LanguageModelComponent", "ChatOutput"}  # the prompt and parser folded in
    model = nodes["llm"]["data"]["node"]["template"]
    assert model["model"]["value"] == [{"name": "flowgate-sim", "provider": "OpenAI"}]
    assert model["system_message"]["value"] == "Be brief. {json} stays."
    assert model["temperature"]["value"] == 0.3
    for node in nodes.values():
        assert node["type"] == "genericNode" and node["data"]["id"] == node["id"]
        assert "code" not in node["data"]["node"]["template"]
    for edge in data["data"]["edges"]:
        for side in ("sourceHandle", "targetHandle"):  # the encoded handle is the same handle
            assert json.loads(edge[side].replace("œ", '"')) == edge["data"][side]
    assert [(e["source"], e["data"]["sourceHandle"]["name"], e["target"],
             e["data"]["targetHandle"]["fieldName"]) for e in data["data"]["edges"]] == [
        ("in", "message", "llm", "input_value"), ("llm", "text_output", "out", "input_value")]


def test_an_exported_flow_imports_back_and_answers_the_same(engine_client, import_flow) -> None:
    for definition, question in ((CHAT, "hello there"), (AGENT, "What is 6*7?")):
        store(engine_client, definition)
        exported = export(engine_client, definition["id"])
        exported["name"] += " (copy)"  # names are unique on one engine
        again = import_flow(exported)
        assert again.status_code == 201, again.get_data(as_text=True)
        copy_id = again.get_json()["flow"]["id"]

        assert answer(engine_client, copy_id, question) == answer(engine_client, definition["id"],
                                                                  question)


def test_the_agent_exports_with_its_tools_and_memory(engine_client) -> None:
    store(engine_client, AGENT)

    nodes = {n["id"]: n["data"] for n in export(engine_client, "agent")["data"]["nodes"]}

    assert set(nodes) == {"in", "calc", "agent", "out"}  # the history is the agent's n_messages
    template = nodes["agent"]["node"]["template"]
    assert (template["n_messages"]["value"], template["max_iterations"]["value"],
            template["system_prompt"]["value"]) == (6, 4, "Compute.")
    assert nodes["calc"]["type"] == "CalculatorComponent" and nodes["calc"]["node"]["tool_mode"]


def test_what_langflow_has_no_component_for_is_drawn_and_noted(engine_client, import_flow) -> None:
    store(engine_client, {"id": "rag", "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "bm25", "type": "BM25Retriever", "params": {"documents": ["a b", "c d"], "k": 1}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "bm25", "target_input": "query"},
                  {"source": "bm25", "target": "out"}]})

    data = export(engine_client, "rag")

    note = data["data"]["nodes"][0]
    assert note["type"] == "noteNode"
    assert "'bm25' is a Flowgate BM25Retriever: LangFlow has no such component" in (
        note["data"]["node"]["description"])
    bm25 = next(n for n in data["data"]["nodes"] if n["id"] == "bm25")["data"]["node"]["template"]
    assert json.loads(bm25["documents"]["value"]) == ["a b", "c d"]
    refused = import_flow(data)  # and importing it back says what cannot come back
    assert refused.status_code == 422
    assert [u["langflow_type"] for u in refused.get_json()["error"]["unsupported"]] == ["BM25Retriever"]


def test_a_version_can_be_exported(engine_client) -> None:
    store(engine_client, CHAT)
    v2 = {**CHAT, "name": "Chat"}
    v2["nodes"] = [*CHAT["nodes"][:2], {**CHAT["nodes"][2], "params": {"model": "other-model"}},
                   *CHAT["nodes"][3:]]
    assert engine_client.put("/api/v1/flows/chat", headers=as_("editor"), json=v2).status_code == 201

    live = export(engine_client, "chat")
    second = export(engine_client, "chat", "&version=2")

    model = lambda d: next(n for n in d["data"]["nodes"] if n["id"] == "llm")[  # noqa: E731
        "data"]["node"]["template"]["model"]["value"][0]["name"]
    assert (model(live), model(second)) == ("flowgate-sim", "other-model")
