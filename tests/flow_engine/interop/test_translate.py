"""LangFlow export → Flowgate definition, pure: for every mapped LangFlow type, what it
becomes, which fields are carried, where edges go, what the report says; and every way an
export cannot be imported, reported at once at its path. Fixtures: examples/langflow/."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from flow_engine.components import ComponentRegistry, default_registry
from flow_engine.flows.validate import validate_flow
from flow_engine.interop.langflow import LangFlowImportError, translate

REGISTRY = default_registry()


def nodes_of(translation: Any) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in translation.definition["nodes"]}


def edges_of(translation: Any) -> set[tuple[str, str, str | None]]:
    return {(e["source"], e["target"], e.get("target_input")) for e in translation.definition["edges"]}


def report_of(translation: Any, langflow_id: str) -> dict[str, Any]:
    return next(n for n in translation.report["nodes"] if n["langflow_id"] == langflow_id)


def refused(export: Any, registry: Any = REGISTRY) -> LangFlowImportError:
    with pytest.raises(LangFlowImportError) as raised:
        translate(export, registry)
    return raised.value


def test_basic_prompting(example) -> None:
    t = translate(example("basic-prompting"), REGISTRY)
    validate_flow(t.definition, REGISTRY, flow_id="x")
    nodes = nodes_of(t)

    assert t.definition["name"] == "Basic Prompting (LangFlow)"
    assert nodes["ChatInput-a1b2c"] == {
        "id": "ChatInput-a1b2c", "type": "ChatInput", "params": {"input_value": "Hello"},
        "label": "Chat Input", "position": {"x": 0, "y": 0}}
    # a variable no edge feeds is written in (as text: its braces stay literal)
    assert nodes["Prompt-p1q2r"]["params"] == {
        "template": "You are a concise assistant for Flowgate. Keep {{braces}}."}
    assert nodes["LanguageModelComponent-m0d3l"]["params"] == {
        "provider": "openai", "model": "flowgate-sim", "temperature": 0.2, "max_tokens": 64}
    # the system message fed by an edge: a ChatPromptTemplate in front of the ChatModel
    assert nodes["LanguageModelComponent-m0d3l-prompt"]["params"] == {
        "system": "{system_message}", "human": "{input_value}"}
    assert edges_of(t) == {
        ("LanguageModelComponent-m0d3l-prompt", "LanguageModelComponent-m0d3l", None),
        ("ChatInput-a1b2c", "LanguageModelComponent-m0d3l-prompt", "input_value"),
        ("Prompt-p1q2r", "LanguageModelComponent-m0d3l-prompt", "system_message"),
        ("LanguageModelComponent-m0d3l", "ChatOutput-z9y8x", "message")}
    assert report_of(t, "note-k3l4m")["status"] == "dropped"
    assert "note" in report_of(t, "note-k3l4m")["reason"]


def test_a_key_in_the_export_is_dropped_warned_about_and_never_echoed(example) -> None:
    export = example("basic-prompting")
    t = translate(export, REGISTRY)
    secret = "sk-test-not-a-real-key-0001"

    [warning] = [w for w in t.report["warnings"] if w["code"] == "api_key_dropped"]
    assert warning["path"] == "$.flow.data.nodes[3].data.node.template.api_key.value"
    assert "an API key in node 'Language Model' (LanguageModelComponent-m0d3l) was dropped" in (
        warning["message"])
    assert "keys come from the engine's settings" in warning["message"]
    assert secret in json.dumps(export)
    assert secret not in json.dumps(t.definition) + json.dumps(t.report)
    ignored = report_of(t, "LanguageModelComponent-m0d3l")["fields"]["ignored"]
    assert {"field": "api_key",
            "reason": "keys come from the engine's settings, never from a flow"} in ignored


def test_the_report_accounts_for_every_field(example) -> None:
    export = example("basic-prompting")
    t = translate(export, REGISTRY)

    for raw, report in zip(export["data"]["nodes"], t.report["nodes"], strict=True):
        template = raw["data"]["node"]["template"]
        fields = {k for k, v in template.items() if isinstance(v, dict) and k != "code"
                  and not k.startswith("_")}
        if report["status"] != "mapped":
            continue
        said = {c["field"] for c in report["fields"]["carried"]} | {
            i["field"] for i in report["fields"]["ignored"]}
        assert said == fields, report["langflow_id"]
    carried = report_of(t, "LanguageModelComponent-m0d3l")["fields"]["carried"]
    assert {"field": "temperature", "node": "LanguageModelComponent-m0d3l",
            "param": "temperature"} in carried
    assert {"field": "input_value", "node": "LanguageModelComponent-m0d3l-prompt",
            "input": "input_value"} in carried


def test_prompt_template_in_double_bracket_mode_and_an_openai_model(example) -> None:
    t = translate(example("prompt-template"), REGISTRY)
    nodes = nodes_of(t)

    assert nodes["Prompt-Template-d0ub1"]["params"]["template"] == (
        "Question: {question}\nUse {{single}} braces as text.")
    assert ("TextInput-t3xt1", "Prompt-Template-d0ub1", "question") in edges_of(t)
    assert nodes["OpenAIModel-0p3n4"]["params"] == {
        "provider": "openai", "model": "flowgate-sim", "temperature": 0.5, "max_tokens": 100,
        "timeout": 30.0, "max_retries": 0}
    assert nodes["OpenAIModel-0p3n4-prompt"]["params"] == {
        "system": "Answer with {{braces}} kept.", "human": "{input_value}"}
    assert nodes["TextInput-t3xt1"]["params"] == {"input_value": "What is a flow?"}
    assert nodes["TextOutput-t3xt0"]["type"] == "TextOutput"
    ignored = {i["field"] for i in report_of(t, "OpenAIModel-0p3n4")["fields"]["ignored"]}
    assert {"seed", "json_mode", "model_kwargs", "stream"} <= ignored


def test_an_agent_with_a_calculator_tool_and_its_memory(example) -> None:
    t = translate(example("agent-calculator"), REGISTRY)
    nodes = nodes_of(t)

    assert nodes["Agent-4g3nt"]["params"] == {
        "provider": "openai", "model": "flowgate-sim", "system_prompt": (
            "You are exact. Use the calculator for arithmetic."),
        "max_iterations": 5, "tools": ["CalculatorComponent_c4lc1"]}
    assert nodes["CalculatorComponent-c4lc1"] == {
        "id": "CalculatorComponent-c4lc1", "type": "Calculator", "label": "Calculator",
        "params": {"name": "calculator", "description": "Computes an arithmetic expression."},
        "position": {"x": 0, "y": 400}}
    assert nodes["Agent-4g3nt-history"]["params"] == {"max_messages": 20, "empty_text": ""}
    assert edges_of(t) >= {
        ("CalculatorComponent-c4lc1", "Agent-4g3nt", "tools.CalculatorComponent_c4lc1"),
        ("Agent-4g3nt-history", "Agent-4g3nt", "history"),
        ("ChatInput-a1b2c", "Agent-4g3nt", "input")}
    added = [f for f in report_of(t, "Agent-4g3nt")["flowgate"] if f.get("added")]
    assert [f["type"] for f in added] == ["ChatHistory"]
    # the key named a LangFlow global variable: dropped too, and the warning says which
    [warning] = [w for w in t.report["warnings"] if w["code"] == "api_key_dropped"]
    assert "refers to LangFlow's global variable 'OPENAI_API_KEY'" in warning["message"]


def test_memory_base_becomes_the_agents_history_and_a_connected_model_its_model(example) -> None:
    t = translate(example("memory-agent"), REGISTRY)
    nodes = nodes_of(t)

    assert nodes["MemoryBase-m3m0r"]["type"] == "ChatHistory"
    assert nodes["MemoryBase-m3m0r"]["params"] == {"max_messages": 8, "empty_text": ""}
    assert ("MemoryBase-m3m0r", "Agent-m3m0r", "history") in edges_of(t)
    assert "Agent-m3m0r-history" not in nodes  # the memory tool stands in for it
    assert nodes["Agent-m3m0r"]["params"]["temperature"] == 0.3  # the connected model's
    assert nodes["Agent-m3m0r"]["params"]["tools"] == ["calculator"]  # add_calculator_tool
    assert report_of(t, "LanguageModelComponent-c0nn3")["status"] == "merged"
    assert "LanguageModelComponent-c0nn3" not in nodes
    assert [w["code"] for w in t.report["warnings"]].count("memory_changed") == 1


def test_split_text_and_parser(example) -> None:
    t = translate(example("split-and-parse"), REGISTRY)
    nodes = nodes_of(t)

    assert nodes["SplitText-sp1it"]["params"] == {"chunk_size": 40, "chunk_overlap": 0,
                                                  "separators": ["\n"]}
    assert nodes["parser-p4rs3"] == {**nodes["parser-p4rs3"], "type": "Parser",
                                     "params": {"template": "- {text}"}}
    assert edges_of(t) == {("TextInput-l1n3s", "SplitText-sp1it", "text"),
                           ("SplitText-sp1it", "parser-p4rs3", "data"),
                           ("parser-p4rs3", "TextOutput-t3xt0", "message")}


def test_message_history_feeds_a_prompt(example) -> None:
    t = translate(example("message-history"), REGISTRY)
    nodes = nodes_of(t)

    assert nodes["Memory-h1st0"]["type"] == "ChatHistory"
    assert nodes["Memory-h1st0"]["params"] == {"max_messages": 6, "empty_text": ""}
    assert nodes["Prompt-h1st1"]["params"]["template"] == "Earlier:\n{history}\n\nUser: {question}"
    assert {("Memory-h1st0", "Prompt-h1st1", "history"),
            ("ChatInput-a1b2c", "Prompt-h1st1", "question"),
            ("Prompt-h1st1", "LanguageModelComponent-h1st2", "prompt")} <= edges_of(t)


def test_knowledge_maps_once_the_engine_has_knowledge_retrievers(example) -> None:
    export = example("knowledge-search")
    without = ComponentRegistry(
        c for c in REGISTRY if c.type_name not in ("KnowledgeRetriever", "KnowledgeSearchTool"))

    [unsupported] = refused(export, without).details["unsupported"]
    assert unsupported["path"] == "$.flow.data.nodes[1]"
    assert unsupported["langflow_type"] == "Knowledge"
    assert "knowledge bases are not available on this engine" in unsupported["what_to_do"]

    t = translate(export, REGISTRY)
    assert nodes_of(t)["Knowledge-kn0w1"]["params"] == {"knowledge_id": "handbook", "k": 3}
    assert nodes_of(t)["Knowledge-kn0w1"]["type"] == "KnowledgeRetriever"
    assert ("ChatInput-a1b2c", "Knowledge-kn0w1", "query") in edges_of(t)
    assert nodes_of(t)["parser-kn0w2"]["params"]["template"] == "{text} ({document})"


def test_knowledge_as_an_agents_tool_becomes_a_search_tool(example) -> None:
    export = example("agent-calculator")
    knowledge = copy.deepcopy(example("knowledge-search")["data"]["nodes"][1])
    knowledge["data"]["node"]["template"]["tools_metadata"] = {
        "type": "tools", "value": [{"name": "handbook", "description": "Searches the handbook."}]}
    export["data"]["nodes"].append(knowledge)
    export["data"]["edges"].append({"source": "Knowledge-kn0w1", "target": "Agent-4g3nt", "data": {
        "sourceHandle": {"name": "component_as_tool"}, "targetHandle": {"fieldName": "tools"}}})

    t = translate(export, REGISTRY)

    assert nodes_of(t)["Knowledge-kn0w1"]["type"] == "KnowledgeSearchTool"
    assert nodes_of(t)["Knowledge-kn0w1"]["params"] == {
        "knowledge_id": "handbook", "k": 3, "name": "handbook",
        "description": "Searches the handbook."}
    assert nodes_of(t)["Agent-4g3nt"]["params"]["tools"] == ["CalculatorComponent_c4lc1",
                                                             "Knowledge_kn0w1"]


def test_run_flow_as_a_tool_becomes_a_flow_tool(example) -> None:
    export = example("agent-calculator")
    calc = export["data"]["nodes"][1]
    calc["data"]["type"] = "RunFlow"
    calc["data"]["node"]["template"]["flow_name_selected"] = {"type": "str", "value": "orders"}

    t = translate(export, REGISTRY)

    assert nodes_of(t)["CalculatorComponent-c4lc1"]["type"] == "FlowTool"
    assert nodes_of(t)["CalculatorComponent-c4lc1"]["params"] == {
        "flow_id": "orders", "description": "Computes an arithmetic expression.",
        "name": "calculator"}


def test_every_unsupported_component_is_listed_at_once(example) -> None:
    error = refused(example("unsupported"))

    assert error.status == 422
    assert [(u["path"], u["langflow_type"], u["display_name"]) for u in
            error.details["unsupported"]] == [
        ("$.flow.data.nodes[1]", "URLComponent", "URL"),
        ("$.flow.data.nodes[2]", "File", "Read File"),
        ("$.flow.data.nodes[3]", "CustomComponent", "My Component")]
    hints = [u["what_to_do"] for u in error.details["unsupported"]]
    assert "make no web requests" in hints[0] and "knowledge base" in hints[1]
    assert "never the code in an export" in hints[2]
    assert [p.path for p in error.problems] == [u["path"] for u in error.details["unsupported"]]
    assert error.message.startswith("3 LangFlow components have no Flowgate equivalent")


def test_custom_code_in_a_mapped_component_is_not_imported_and_says_so(example) -> None:
    export = example("basic-prompting")
    export["data"]["nodes"][0]["data"]["node"]["edited"] = True

    t = translate(export, REGISTRY)

    [warning] = [w for w in t.report["warnings"] if w["code"] == "custom_code"]
    assert warning["message"] == (
        "custom code in node 'Chat Input' (ChatInput-a1b2c) was not imported: Flowgate runs "
        "its own ChatInput 'ChatInput-a1b2c', never code from an export")


@pytest.mark.parametrize(("mutate", "path", "fragment"), [
    pytest.param(lambda e: e.pop("data"), "$.flow.data", "missing 'data'", id="no-data"),
    pytest.param(lambda e: e["data"].update(nodes={}), "$.flow.data.nodes", "must be a list",
                 id="nodes-not-list"),
    pytest.param(lambda e: e["data"]["nodes"].append("x"), "$.flow.data.nodes[5]", "an object",
                 id="node-not-object"),
    pytest.param(lambda e: e["data"]["nodes"].append(copy.deepcopy(e["data"]["nodes"][0])),
                 "$.flow.data.nodes[5].id", "duplicate node id", id="duplicate-id"),
    pytest.param(lambda e: e["data"]["edges"][0].update(target="nowhere"),
                 "$.flow.data.edges[0]", "is no node of the export", id="dangling-edge"),
    pytest.param(lambda e: e["data"]["edges"][0]["data"]["targetHandle"].update(
        fieldName="sender_name"), "$.flow.data.edges[0]", "has no Flowgate equivalent",
        id="unknown-field"),
    pytest.param(lambda e: e["data"]["nodes"][1]["data"]["node"]["template"]["template"].update(
        value="{x.__class__}"), "$.flow.data.nodes[1].data.node.template.template.value",
        "reaches into an attribute", id="template-attack"),
])
def test_broken_exports_are_reported_at_their_paths(example, mutate, path: str, fragment: str) -> None:
    export = example("basic-prompting")
    mutate(export)

    error = refused(export)

    assert any(p.path == path and fragment in p.message for p in error.problems), error.problems


def test_mustache_sections_have_no_equivalent(example) -> None:
    export = example("prompt-template")
    export["data"]["nodes"][1]["data"]["node"]["template"]["template"]["value"] = (
        "{{#items}}{{.}}{{/items}}")

    [problem] = refused(export).problems

    assert problem.path == "$.flow.data.nodes[1].data.node.template.template.value"
    assert "mustache sections" in problem.message


def test_handles_are_read_from_the_encoded_strings_when_data_is_missing(example) -> None:
    export = example("basic-prompting")
    for edge in export["data"]["edges"]:
        del edge["data"]

    assert edges_of(translate(export, REGISTRY)) == edges_of(
        translate(example("basic-prompting"), REGISTRY))


def test_validation_problems_are_located_in_the_export(example) -> None:
    export = example("split-and-parse")
    export["data"]["nodes"][1]["data"]["node"]["template"]["chunk_overlap"]["value"] = 50
    t = translate(export, REGISTRY)

    from flow_engine.errors import FlowInvalid

    with pytest.raises(FlowInvalid) as raised:
        validate_flow(t.definition, REGISTRY, flow_id="x")
    [problem] = t.locate(raised.value.problems)

    assert problem.path == "$.flow.data.nodes[1].data.node.template.chunk_overlap.value"
    assert problem.message == ("chunk_overlap (50) must be smaller than chunk_size (40) "
                               "[Flowgate TextSplitter 'SplitText-sp1it', param 'chunk_overlap']")


def test_ids_that_are_not_flowgate_ids_are_made_into_ones(example) -> None:
    export = example("prompt-template")  # "Prompt Template-d0ub1" has a space
    t = translate(export, REGISTRY)
    node = report_of(t, "Prompt Template-d0ub1")

    assert node["flowgate"] == [{"id": "Prompt-Template-d0ub1", "type": "PromptTemplate"}]


def test_nothing_in_the_export_is_evaluated(example) -> None:
    """Every string of the export stays a string: code fields hold Python that would raise
    if run; translating must not even look at it beyond "is there code"."""
    export = example("basic-prompting")
    for node in export["data"]["nodes"]:
        template = node["data"]["node"].get("template", {})
        if "code" in template:
            template["code"]["value"] = "raise SystemExit('the code of an export ran')"

    translate(export, REGISTRY)  # no SystemExit


@pytest.mark.parametrize(("type_", "mode", "params"), [
    pytest.param("parser", "Parser", {"template": "- {text}"}, id="parser"),
    pytest.param("ParserComponent", "Parser", {"template": "- {text}"}, id="ParserComponent"),
    pytest.param("ParserComponent", "Stringify", {"mode": "stringify"}, id="stringify"),
])
def test_both_parser_types_and_modes(example, type_: str, mode: str, params: dict) -> None:
    export = example("split-and-parse")
    parser = export["data"]["nodes"][2]["data"]
    parser["type"] = type_
    parser["node"]["template"]["mode"]["value"] = mode

    assert nodes_of(translate(export, REGISTRY))["parser-p4rs3"]["params"] == params


@pytest.mark.parametrize("value", ["", "   ", None])
def test_a_knowledge_node_with_no_base_chosen_says_how_to_pick_one(example, value) -> None:
    """LangFlow's starter flows ship their Knowledge node with the dropdown empty."""
    export = example("knowledge-search")
    export["data"]["nodes"][1]["data"]["node"]["template"]["knowledge_base"]["value"] = value

    [problem] = refused(export).problems

    assert problem.path == "$.flow.data.nodes[1].data.node.template.knowledge_base.value"
    assert problem.message == (
        "Knowledge 'Knowledge' (Knowledge-kn0w1) has no knowledge base chosen: pick a Flowgate "
        "knowledge base (GET /api/v1/knowledge, or `flowgate knowledge list`) and write its id "
        "or name in this field")


def loop_export(example: Any) -> dict[str, Any]:
    """basic-prompting with a Loop component and LangFlow's loop-back edge: the Prompt's
    output goes back into the Loop's ``item`` *output* (``targetHandle.name``, no
    ``fieldName``), as LangFlow writes a loop."""
    export = example("basic-prompting")
    loop = copy.deepcopy(export["data"]["nodes"][1])
    loop["id"] = loop["data"]["id"] = "LoopComponent-l00p1"
    loop["data"]["type"] = "LoopComponent"
    loop["data"]["node"]["display_name"] = "Loop"
    export["data"]["nodes"].append(loop)
    export["data"]["edges"].append({
        "source": "Prompt-p1q2r", "target": "LoopComponent-l00p1", "data": {
            "sourceHandle": {"dataType": "Prompt", "id": "Prompt-p1q2r", "name": "prompt",
                             "output_types": ["Message"]},
            "targetHandle": {"dataType": "LoopComponent", "id": "LoopComponent-l00p1",
                             "name": "item", "output_types": ["Data"]}}})
    return export


def test_a_loop_is_reported_once_not_again_for_its_loop_back_edge(example) -> None:
    error = refused(loop_export(example))

    [problem] = error.problems
    assert problem.path == "$.flow.data.nodes[5]"
    assert "flows are acyclic" in problem.message
    assert [u["langflow_type"] for u in error.details["unsupported"]] == ["LoopComponent"]


def test_a_loop_back_edge_into_a_mapped_node_is_one_clear_problem(example) -> None:
    export = loop_export(example)
    export["data"]["nodes"].pop()  # the edge now loops back into the Prompt itself
    edge = export["data"]["edges"][-1]
    edge["target"] = edge["data"]["targetHandle"]["id"] = "Prompt-p1q2r"

    [problem] = refused(export).problems

    assert problem.path == "$.flow.data.edges[3]"
    assert problem.message == (
        "a loop-back edge from 'Prompt Template' (Prompt-p1q2r) into output 'item' of "
        "'Prompt Template' (Prompt-p1q2r): Flowgate flows are acyclic; loop in your app, or let "
        "an Agent call a FlowTool")
