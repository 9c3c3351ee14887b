"""``POST /api/v1/flows/import`` end to end: LangFlow exports (examples/langflow/) become
flows that run on the real llm-sim, sync and streamed, and answer exactly what the
equivalent hand-written Flowgate flow answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sseclient
from support.keys import as_


def run(client: Any, flow_id: str, text: str, stream: bool = False, **body: Any) -> Any:
    query = "?stream=true" if stream else ""
    resp = client.post(f"/api/v1/run/{flow_id}{query}", headers=as_("runner"),
                       json={"input_value": text, **body})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    if not stream:
        return resp.get_json()
    return [(e.event, json.loads(e.data)) for e in sseclient.SSEClient(resp.iter_encoded()).events()]


def create(client: Any, definition: dict[str, Any]) -> str:
    resp = client.post("/api/v1/flows", headers=as_("editor"), json=definition)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()["id"]


def imported(import_flow, export: dict[str, Any], **fields: Any) -> dict[str, Any]:
    resp = import_flow(export, **fields)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


HAND_WRITTEN = {
    "basic-prompting": {
        "id": "hand-basic", "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "p", "type": "ChatPromptTemplate", "params": {
                "system": "You are a concise assistant for Flowgate. Keep {{braces}}.",
                "human": "{question}"}},
            {"id": "llm", "type": "ChatModel", "params": {
                "model": "flowgate-sim", "temperature": 0.2, "max_tokens": 64}},
            {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
                  {"source": "llm", "target": "out"}]},
    "agent-calculator": {
        "id": "hand-agent", "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "calc", "type": "Calculator"},
            {"id": "history", "type": "ChatHistory", "params": {"empty_text": ""}},
            {"id": "agent", "type": "Agent", "params": {
                "model": "flowgate-sim", "tools": ["calc"], "max_iterations": 5,
                "system_prompt": "You are exact. Use the calculator for arithmetic."}},
            {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "agent", "target_input": "input"},
                  {"source": "calc", "target": "agent", "target_input": "tools.calc"},
                  {"source": "history", "target": "agent", "target_input": "history"},
                  {"source": "agent", "target": "out"}]},
    "prompt-template": {
        "id": "hand-template", "nodes": [
            {"id": "in", "type": "TextInput"},
            {"id": "q", "type": "PromptTemplate", "params": {
                "template": "Question: {q}\nUse {{single}} braces as text."}},
            {"id": "p", "type": "ChatPromptTemplate", "params": {
                "system": "Answer with {{braces}} kept.", "human": "{text}"}},
            {"id": "llm", "type": "ChatModel", "params": {
                "model": "flowgate-sim", "temperature": 0.5, "max_tokens": 100}},
            {"id": "out", "type": "TextOutput"}],
        "edges": [{"source": "in", "target": "q"}, {"source": "q", "target": "p"},
                  {"source": "p", "target": "llm"}, {"source": "llm", "target": "out"}]},
}
QUESTIONS = {"basic-prompting": "How do I start?", "agent-calculator": "What is (12 + 30) * 2?",
             "prompt-template": "What is a flow?"}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_an_imported_flow_answers_as_the_hand_written_one(engine_client, import_flow, example,
                                                          fresh_llm_sim, name: str) -> None:
    body = imported(import_flow, example(name))
    flow_id = body["flow"]["id"]
    hand = create(engine_client, HAND_WRITTEN[name])
    kind = {"input_type": "text", "output_type": "text"} if name == "prompt-template" else {}

    answer = run(engine_client, flow_id, QUESTIONS[name], **kind)
    events = run(engine_client, flow_id, QUESTIONS[name], stream=True, **kind)
    expected = run(engine_client, hand, QUESTIONS[name], **kind)

    assert answer["output"] == expected["output"] and answer["output"].startswith("[simulated reply]")
    assert events[-1][0] == "run_finished" and events[-1][1]["output"] == answer["output"]
    tokens = "".join(data["text"] for kind_, data in events if kind_ == "token")
    assert tokens == answer["output"]
    assert answer["usage"] == {**expected["usage"]}
    assert (body["version"], body["live"]) == (1, True)


def test_the_import_answer_holds_the_flow_and_the_report(import_flow, example) -> None:
    resp = import_flow(example("basic-prompting"), message="from the LangFlow workspace")
    body = resp.get_json()

    assert resp.status_code == 201
    assert resp.headers["Location"] == f"/api/v1/flows/{body['flow']['id']}"
    assert body["flow"]["id"].startswith("basic-prompting-langflow-")
    assert body["flow"]["name"] == "Basic Prompting (LangFlow)"
    assert body["message"] == "from the LangFlow workspace"
    report = body["report"]
    assert report["source"] == {"format": "langflow", "name": "Basic Prompting (LangFlow)",
                                "nodes": 5, "edges": 3}
    assert [(n["langflow_type"], n["status"], [f["type"] for f in n["flowgate"]])
            for n in report["nodes"]] == [
        ("ChatInput", "mapped", ["ChatInput"]), ("Prompt", "mapped", ["PromptTemplate"]),
        ("note", "dropped", []), ("LanguageModelComponent", "mapped", ["ChatModel",
                                                                       "ChatPromptTemplate"]),
        ("ChatOutput", "mapped", ["ChatOutput"])]
    assert [e["status"] for e in report["edges"]] == ["mapped"] * 3
    assert [w["code"] for w in report["warnings"]] == ["api_key_dropped"]


def test_a_flow_without_an_llm_runs_offline(engine_client, import_flow, example) -> None:
    flow_id = imported(import_flow, example("split-and-parse"))["flow"]["id"]

    text = "the first line is here\nthe second line is here\nthe third line is here too"

    out = run(engine_client, flow_id, text, input_type="text", output_type="text")

    # chunks of at most 40 characters, split at line ends; one list item each
    assert out["output"] == ("- the first line is here\n- the second line is here\n"
                             "- the third line is here too")


def test_imported_history_remembers_the_session(engine_client, import_flow, example,
                                                fresh_llm_sim) -> None:
    flow_id = imported(import_flow, example("message-history"))["flow"]["id"]

    run(engine_client, flow_id, "My name is Ada.", session_id="s1")
    run(engine_client, flow_id, "What is my name?", session_id="s1")

    second = fresh_llm_sim.requests()[-1]["body"]["messages"][-1]["content"]
    assert second.startswith("Earlier:\nHuman: My name is Ada.\nAI: [simulated reply]")
    assert second.endswith("User: What is my name?")


def test_knowledge_nodes_are_checked_against_the_engines_bases(import_flow, example) -> None:
    resp = import_flow(example("knowledge-search"))

    assert resp.status_code == 422
    [problem] = resp.get_json()["error"]["problems"]
    assert problem["path"].startswith("$.flow.data.nodes[1]")  # the Knowledge node
    assert "handbook" in problem["message"] or "knowledge" in problem["message"]


def test_a_knowledge_node_with_no_base_chosen_is_a_422_saying_how_to_pick_one(
        import_flow, example) -> None:
    export = example("knowledge-search")
    export["data"]["nodes"][1]["data"]["node"]["template"]["knowledge_base"]["value"] = ""

    resp = import_flow(export)

    assert resp.status_code == 422
    [problem] = resp.get_json()["error"]["problems"]
    assert problem["path"] == "$.flow.data.nodes[1].data.node.template.knowledge_base.value"
    assert "pick a Flowgate knowledge base (GET /api/v1/knowledge" in problem["message"]


def test_an_import_with_an_id_is_a_new_version_published_only_when_asked(
        engine_client, import_flow, example) -> None:
    first = imported(import_flow, example("basic-prompting"), id="assistant")
    second = imported(import_flow, example("prompt-template"), id="assistant",
                      who="editor")
    third = imported(import_flow, example("prompt-template"), id="assistant", publish=True,
                     who="publisher")

    assert (first["version"], first["live"]) == (1, True)
    assert (second["version"], second["live"], second["flow"]["live_version"]) == (2, False, 1)
    assert (third["version"], third["live"], third["flow"]["live_version"]) == (3, True, 3)
    assert third["flow"]["name"] == "Basic Prompting (LangFlow)"  # the flow keeps its name
    versions = engine_client.get("/api/v1/flows/assistant/versions", headers=as_("runner"))
    assert [v["version"] for v in versions.get_json()["versions"]] == [1, 2, 3]


def test_unsupported_components_are_a_422_listing_each(import_flow, example, engine_client) -> None:
    resp = import_flow(example("unsupported"))
    error = resp.get_json()["error"]

    assert resp.status_code == 422 and error["code"] == "flow_invalid"
    assert [u["langflow_type"] for u in error["unsupported"]] == [
        "URLComponent", "File", "CustomComponent"]
    assert all(u["what_to_do"] for u in error["unsupported"])
    assert error["trace_id"]
    assert engine_client.get("/api/v1/flows", headers=as_("runner")).get_json()["flows"] == []


def test_an_imported_agent_streams_its_tool_events(engine_client, import_flow, example) -> None:
    flow_id = imported(import_flow, example("agent-calculator"))["flow"]["id"]

    events = run(engine_client, flow_id, "What is 6*7?", stream=True)

    kinds = [k for k, data in events if data.get("node") == "Agent-4g3nt"]
    assert kinds[0] == "node_started" and kinds[-1] == "node_finished"
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("token")
    call = next(d for k, d in events if k == "tool_call")
    result = next(d for k, d in events if k == "tool_result")
    assert (call["tool"], call["args"]) == ("calculator", {"expression": "6*7"})
    assert (result["tool"], result["status"], result["output"], result["call_id"]) == (
        "calculator", "success", "42", call["call_id"])
