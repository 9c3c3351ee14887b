"""flow_engine.flows.validate: every rule reports a JSON path and a message that says how to
fix it; all problems come back at once. Also apply_tweaks, template_fields, and the
structural rules of the flows package (pure: no web, SQL, network or dynamic imports)."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flow_engine
from flow_engine.components import Limits, default_registry
from flow_engine.errors import FlowInvalid, Problem
from flow_engine.flows.model import Edge, FlowDefinition
from flow_engine.flows.templates import template_fields
from flow_engine.flows.validate import apply_tweaks, validate_flow

REGISTRY = default_registry()
ENGINE_DIR = Path(flow_engine.__file__).resolve().parent


# ---------------------------------------------------------------------------------------
# Flow-building helpers


def node(node_id: str, type_: str, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": node_id, "type": type_}
    if params:
        out["params"] = params
    return out


def edge(source: str, target: str, target_input: str | None = None,
         source_output: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"source": source, "target": target}
    if target_input is not None:
        out["target_input"] = target_input
    if source_output is not None:
        out["source_output"] = source_output
    return out


def flow(nodes: list, edges: list | None = None, **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": "f", "nodes": nodes, "edges": edges or []}
    data.update(top)
    return copy.deepcopy(data)  # the shared IN/OUT dicts must never be mutated by a test


IN = node("in", "ChatInput")
OUT = node("out", "ChatOutput")


def around(step: dict[str, Any], target_input: str | None = None,
           source_output: str | None = None) -> dict[str, Any]:
    """``in → step → out``: the step is ``$.nodes[1]``, its edges ``$.edges[0]`` and ``[1]``."""
    return flow(
        [IN, step, OUT],
        [edge("in", step["id"], target_input), edge(step["id"], "out", None, source_output)],
    )


def minimal() -> dict[str, Any]:
    return flow([IN, OUT], [edge("in", "out")])


DEFAULT_LIMITS = Limits()


def problems_of(data: Any, limits: Limits = DEFAULT_LIMITS, **kwargs: Any) -> list[Problem]:
    with pytest.raises(FlowInvalid) as info:
        validate_flow(data, REGISTRY, limits, **kwargs)
    return info.value.problems


def assert_problems(problems: list[Problem], expected: list[tuple[str, str]]) -> None:
    """Exactly the expected paths (with multiplicity), each message holding its fragment."""
    got = sorted(p.path for p in problems)
    assert got == sorted(path for path, _ in expected), problems
    for path, fragment in expected:
        messages = [p.message for p in problems if p.path == path]
        assert any(fragment in m for m in messages), (path, fragment, messages)


# The DESIGN.md "Flow definition" example, with the offline echo provider and real documents.
def design_example() -> dict[str, Any]:
    return {
        "id": "faq-qa", "name": "FAQ answerer",
        "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "ctx", "type": "BM25Retriever",
             "params": {"documents": ["Refunds take 5 days.", "Shipping is free."], "k": 3}},
            {"id": "p", "type": "PromptTemplate",
             "params": {"template": "Context: {context}\nQ: {question}"}},
            {"id": "llm", "type": "ChatModel",
             "params": {"provider": "echo", "model": "gpt-4o-mini", "temperature": 0}},
            {"id": "out", "type": "ChatOutput"}],
        "edges": [
            {"source": "in", "target": "ctx"},
            {"source": "in", "target": "p", "target_input": "question"},
            {"source": "ctx", "target": "p", "target_input": "context"},
            {"source": "p", "target": "llm"}, {"source": "llm", "target": "out"}],
    }


def design_example_with_query_port() -> dict[str, Any]:
    data = design_example()
    data["edges"][0]["target_input"] = "query"
    return data


# ---------------------------------------------------------------------------------------
# Valid definitions


def test_valid_definition_resolves_every_edge_port() -> None:
    definition = validate_flow(design_example_with_query_port(), REGISTRY)

    assert isinstance(definition, FlowDefinition)
    assert (definition.id, definition.name, definition.description) == ("faq-qa", "FAQ answerer", "")
    assert [(n.id, n.type) for n in definition.nodes] == [
        ("in", "ChatInput"), ("ctx", "BM25Retriever"), ("p", "PromptTemplate"),
        ("llm", "ChatModel"), ("out", "ChatOutput")]
    assert definition.node("llm").params == {
        "provider": "echo", "model": "gpt-4o-mini", "temperature": 0}
    assert definition.edges == (
        Edge("in", "ctx", "message", "query"),
        Edge("in", "p", "message", "question"),
        Edge("ctx", "p", "documents", "context"),
        Edge("p", "llm", "prompt", "prompt"),
        Edge("llm", "out", "message", "message"),
    )


def test_raw_is_a_deep_copy_of_the_input() -> None:
    data = design_example_with_query_port()
    snapshot = copy.deepcopy(data)
    definition = validate_flow(data, REGISTRY)

    data["nodes"][1]["params"]["documents"].append("injected")
    data["nodes"][2]["params"]["template"] = "changed {question}"
    data["edges"].clear()
    data["name"] = "renamed"

    assert definition.raw == snapshot


def test_node_params_do_not_alias_the_input() -> None:
    data = design_example_with_query_port()
    definition = validate_flow(data, REGISTRY)

    data["nodes"][1]["params"]["k"] = 99

    assert definition.node("ctx").params["k"] == 3


def test_design_md_example_validates_verbatim() -> None:
    definition = validate_flow(design_example(), REGISTRY)

    assert definition.edges[0] == Edge("in", "ctx", "message", "query")


def test_flow_id_argument_supplies_a_missing_id_and_default_name() -> None:
    data = minimal()
    del data["id"]

    definition = validate_flow(data, REGISTRY, flow_id="given-id")

    assert (definition.id, definition.name) == ("given-id", "given-id")


def test_optional_node_keys_are_accepted() -> None:
    data = minimal()
    data["nodes"][0].update(position={"x": 1, "y": 2}, label="Question")
    data["edges"][0]["id"] = "e1"

    definition = validate_flow(data, REGISTRY)

    assert definition.edges == (Edge("in", "out", "message", "message"),)


# ---------------------------------------------------------------------------------------
# Invalid definitions: one rule per case, exact paths


def _without_id() -> dict[str, Any]:
    data = minimal()
    del data["id"]
    data["name"] = "named"
    return data


INVALID = [
    # the document itself
    pytest.param([], [("$", "a flow must be a JSON object, got a list")], id="not-object-list"),
    pytest.param("flow", [("$", "got a string")], id="not-object-string"),
    pytest.param(None, [("$", "got null")], id="not-object-null"),
    pytest.param({**minimal(), "owner": "me"},
                 [("$.owner", "unknown key 'owner' (allowed: description, edges, id, name, nodes, "
                               "tweakable)")],
                 id="unknown-top-level-key"),
    pytest.param(_without_id(), [("$.id", "missing flow id")], id="missing-id"),
    pytest.param({**minimal(), "id": "has space"},
                 [("$.id", "flow id must be 1-64 characters of letters, digits")], id="bad-id-chars"),
    pytest.param({**minimal(), "id": "a" * 65}, [("$.id", "1-64 characters")], id="id-too-long"),
    pytest.param({**minimal(), "id": 42, "name": "n"}, [("$.id", "1-64 characters")],
                 id="id-not-string"),
    pytest.param({**minimal(), "name": "  "}, [("$.name", "non-empty string")], id="blank-name"),
    pytest.param({**minimal(), "description": 5},
                 [("$.description", "description must be a string")], id="description-not-string"),
    # nodes
    pytest.param(flow([]), [("$.nodes", "nodes must be a non-empty list")], id="no-nodes"),
    pytest.param({"id": "f", "nodes": {"in": IN}},
                 [("$.nodes", "nodes must be a non-empty list")], id="nodes-not-list"),
    pytest.param(flow([IN, "x", OUT], [edge("in", "out")]),
                 [("$.nodes[1]", "a node must be an object, got a string")], id="node-not-object"),
    pytest.param(flow([IN, {**OUT, "colour": "red"}], [edge("in", "out")]),
                 [("$.nodes[1].colour", "unknown key 'colour' on a node")], id="unknown-node-key"),
    pytest.param(flow([IN, OUT, node("bad id", "TextOutput")], [edge("in", "out")]),
                 [("$.nodes[2].id", "node id must be 1-64 characters")], id="bad-node-id"),
    pytest.param(flow([IN, OUT, node("out", "TextOutput")], [edge("in", "out")]),
                 [("$.nodes[2].id", "duplicate node id 'out' (also $.nodes[1])")],
                 id="duplicate-node-id"),
    pytest.param(flow([IN, OUT, {"id": "x", "type": "TextOutput", "params": [1]}],
                      [edge("in", "out")]),
                 [("$.nodes[2].params", "params must be an object, got a list")],
                 id="params-not-object"),
    pytest.param(around(node("llm", "ChatModle")),
                 [("$.nodes[1].type",
                   "unknown node type \"ChatModle\"; did you mean 'ChatModel'? (known types: ")],
                 id="unknown-type-suggestion"),
    pytest.param(around(node("x", "os.system")),
                 [("$.nodes[1].type", 'unknown node type "os.system" (known types: Agent, BM25Retriever,')],
                 id="unknown-type-import-path"),
    pytest.param(around({"id": "x"}), [("$.nodes[1].type", "unknown node type null")],
                 id="missing-type"),
    # params against each component's JSON Schema
    pytest.param(around(node("ctx", "BM25Retriever", documnets=["a"]), "query"),
                 [("$.nodes[1].params",
                   "unknown param 'documnets' for BM25Retriever (known params: b, documents, k, "
                   "k1); did you mean 'documents'?")], id="unknown-param-suggestion"),
    pytest.param(around(node("llm", "ChatModel", provider="echo", colour="red")),
                 [("$.nodes[1].params", "unknown param 'colour' for ChatModel")],
                 id="unknown-param-no-suggestion"),
    pytest.param(around(node("ctx", "BM25Retriever", k="3"), "query"),
                 [("$.nodes[1].params.k", "'3' is not of type 'integer'")], id="bm25-k-string"),
    pytest.param(around(node("ctx", "BM25Retriever", k=0), "query"),
                 [("$.nodes[1].params.k", "0 is less than the minimum of 1")], id="bm25-k-zero"),
    pytest.param(around(node("ctx", "BM25Retriever", documents=["ok", 5]), "query"),
                 [("$.nodes[1].params.documents[1]", "not valid under any of the given schemas")],
                 id="bm25-document-not-text"),
    pytest.param(around(node("llm", "ChatModel", provider="echo", temperature=5)),
                 [("$.nodes[1].params.temperature", "5 is greater than the maximum of 2")],
                 id="chatmodel-temperature"),
    pytest.param(around(node("llm", "ChatModel", provider="bogus")),
                 [("$.nodes[1].params.provider", "'bogus' is not one of ['openai', 'echo']")],
                 id="chatmodel-provider"),
    pytest.param(around(node("llm", "ChatModel", base_url="ftp://llm.local")),
                 [("$.nodes[1].params.base_url", "does not match '^https?://'")],
                 id="chatmodel-base-url-scheme"),
    pytest.param(around(node("llm", "ChatModel", max_tokens=1.5)),
                 [("$.nodes[1].params.max_tokens", "1.5 is not of type 'integer'")],
                 id="chatmodel-max-tokens-float"),
    pytest.param(around(node("r", "ConditionalRouter", pattern="x", operator="like"),
                        source_output="true"),
                 [("$.nodes[1].params.operator", "'like' is not one of")], id="router-operator"),
    pytest.param(flow([IN, node("p", "PromptTemplate"), OUT], [edge("p", "out")]),
                 [("$.nodes[1].params", "'template' is a required property")],
                 id="template-required"),
    pytest.param(around(node("t", "TextSplitter", chunk_size=10, chunk_overlap=10)),
                 [("$.nodes[1].params.chunk_overlap",
                   "chunk_overlap (10) must be smaller than chunk_size (10)")],
                 id="splitter-overlap-equals-size"),
    pytest.param(around(node("t", "TextSplitter", chunk_size=10, chunk_overlap=50)),
                 [("$.nodes[1].params.chunk_overlap", "(50) must be smaller than chunk_size (10)")],
                 id="splitter-overlap-above-size"),
    pytest.param(around(node("t", "TextSplitter", chunk_size=100)),
                 [("$.nodes[1].params.chunk_overlap", "(200) must be smaller than chunk_size (100)")],
                 id="splitter-default-overlap-above-size"),
    # edges
    pytest.param({**minimal(), "edges": {"in": "out"}}, [("$.edges", "edges must be a list")],
                 id="edges-not-list"),
    pytest.param(flow([IN, OUT], [edge("in", "out"), "in->out"]),
                 [("$.edges[1]", "an edge must be an object, got a string")], id="edge-not-object"),
    pytest.param(flow([IN, OUT], [{**edge("in", "out"), "weight": 1}]),
                 [("$.edges[0].weight", "unknown key 'weight' on an edge")], id="unknown-edge-key"),
    pytest.param(flow([IN, OUT], [edge("in", "nope"), edge("ghost", "out")]),
                 [("$.edges[0].target", 'edge target "nope" is not a node of this flow'),
                  ("$.edges[1].source", 'edge source "ghost" is not a node of this flow')],
                 id="edges-to-missing-nodes"),
    pytest.param(flow([IN, OUT], [edge("in", "out", target_input="text")]),
                 [("$.edges[0].target_input",
                   "node 'out' (ChatOutput) has no input 'text' (inputs: message)")],
                 id="edge-into-missing-input"),
    pytest.param(flow([IN, node("in2", "TextInput"), OUT], [edge("in", "in2"), edge("in", "out")]),
                 [("$.edges[0].target_input", "node 'in2' (TextInput) takes no inputs")],
                 id="edge-into-input-node"),
    pytest.param(flow([IN, OUT], [edge("in", "out", source_output="result")]),
                 [("$.edges[0].source_output",
                   "node 'in' (ChatInput) has no output 'result' (outputs: message)")],
                 id="edge-from-missing-output"),
    pytest.param(around(node("p", "PromptTemplate", template="{a} {b}")),
                 [("$.edges[0].target_input",
                   "node 'p' (PromptTemplate) has inputs a, b; set target_input to one of them")],
                 id="target-input-ambiguous"),
    pytest.param(around(node("r", "ConditionalRouter", pattern="yes")),
                 [("$.edges[1].source_output",
                   "node 'r' (ConditionalRouter) has outputs true, false; set source_output")],
                 id="router-needs-source-output"),
    pytest.param(around(node("r", "ConditionalRouter", pattern="yes"), source_output="maybe"),
                 [("$.edges[1].source_output", "has no output 'maybe' (outputs: true, false)")],
                 id="router-unknown-source-output"),
    pytest.param(flow([IN, node("in2", "TextInput"), OUT], [edge("in", "out"), edge("in2", "out")]),
                 [("$.edges[1]", "input 'message' of node 'out' is already fed by $.edges[0]; "
                                 "an input takes one edge")], id="input-fed-twice"),
    pytest.param(flow([IN, node("s", "StrOutputParser"), OUT],
                      [edge("in", "s"), edge("s", "s"), edge("s", "out")]),
                 [("$.edges[1]", "edge from 's' to itself; a flow must be acyclic")],
                 id="self-loop"),
    # graph
    pytest.param(flow([IN, node("p", "PromptTemplate", template="{a} {b}"), OUT],
                      [edge("in", "p", "a"), edge("p", "out")]),
                 [("$.nodes[1]", "required input 'b' of node 'p' (PromptTemplate) is not "
                                 "connected; add an edge with target 'p' and target_input 'b'")],
                 id="template-field-unconnected"),
    pytest.param(flow([IN, OUT, node("t", "TextOutput")], [edge("in", "out")]),
                 [("$.nodes[2]", "required input 'message' of node 't' (TextOutput)")],
                 id="output-unconnected"),
    pytest.param(flow([node("p", "PromptTemplate", template="static"), OUT], [edge("p", "out")]),
                 [("$.nodes", "the flow has no input node (add a ChatInput or TextInput)")],
                 id="no-input-node"),
    pytest.param(flow([IN, node("s", "StrOutputParser")], [edge("in", "s")]),
                 [("$.nodes", "the flow has no output node (add a ChatOutput or TextOutput)")],
                 id="no-output-node"),
]


@pytest.mark.parametrize(("data", "expected"), INVALID)
def test_invalid_definition_reports_path_and_message(
    data: Any, expected: list[tuple[str, str]]
) -> None:
    assert_problems(problems_of(data), expected)


# ---------------------------------------------------------------------------------------
# Cycles


def _cycle_flow() -> dict[str, Any]:
    # in → p.a; p → llm → s → p.b (a cycle through three nodes); llm → out
    return flow(
        [IN, node("p", "PromptTemplate", template="{a} {b}"),
         node("llm", "ChatModel", provider="echo"), node("s", "StrOutputParser"), OUT],
        [edge("in", "p", "a"), edge("s", "p", "b"), edge("p", "llm"), edge("llm", "s"),
         edge("llm", "out")],
    )


def _two_cycle_flow() -> dict[str, Any]:
    return flow(
        [IN, node("p", "PromptTemplate", template="{a} {b}"), node("s", "StrOutputParser"), OUT],
        [edge("in", "p", "a"), edge("p", "s"), edge("s", "p", "b"), edge("p", "out")],
    )


@pytest.mark.parametrize(("data", "message"), [
    pytest.param(_cycle_flow(), "cycle: p → llm → s → p; a flow must be acyclic", id="three-nodes"),
    pytest.param(_two_cycle_flow(), "cycle: p → s → p; a flow must be acyclic", id="two-nodes"),
])
def test_cycle_names_its_nodes_in_order(data: dict[str, Any], message: str) -> None:
    assert problems_of(data) == [Problem("$.edges", message)]


# ---------------------------------------------------------------------------------------
# Size limits


def _compact_size(data: Any) -> int:
    return len(json.dumps(data, separators=(",", ":")))


@pytest.mark.parametrize(("data", "limits", "expected"), [
    pytest.param(flow([IN, OUT, node("t", "TextOutput")]), Limits(max_nodes=2),
                 [("$.nodes", "3 nodes; the limit is 2")], id="max-nodes"),
    pytest.param(flow([IN, OUT, node("t", "TextOutput")], [edge("in", "out"), edge("in", "t")]),
                 Limits(max_edges=1), [("$.edges", "2 edges; the limit is 1")], id="max-edges"),
    pytest.param(around(node("p", "PromptTemplate", template="0123456789 {q}")),
                 Limits(max_template_chars=10),
                 [("$.nodes[1].params.template", "template is 14 characters; the limit is 10")],
                 id="prompt-template-length"),
    pytest.param(around(node("p", "ChatPromptTemplate", system="x" * 11, human="{q}")),
                 Limits(max_template_chars=10),
                 [("$.nodes[1].params.system", "template is 11 characters; the limit is 10")],
                 id="chat-system-template-length"),
    pytest.param(minimal(), Limits(max_definition_bytes=_compact_size(minimal()) - 1),
                 [("$", f"definition is {_compact_size(minimal())} bytes; the limit is "
                        f"{_compact_size(minimal()) - 1}")], id="definition-size"),
])
def test_limit_exceeded(data: dict[str, Any], limits: Limits,
                        expected: list[tuple[str, str]]) -> None:
    assert_problems(problems_of(data, limits), expected)


@pytest.mark.parametrize("limits", [
    pytest.param(Limits(max_nodes=3), id="max-nodes"),
    pytest.param(Limits(max_edges=2), id="max-edges"),
    pytest.param(Limits(max_template_chars=len("0123456789 {q}")), id="template-chars"),
    pytest.param(Limits(max_definition_bytes=10_000), id="definition-size"),
])
def test_flow_exactly_at_each_limit_is_valid(limits: Limits) -> None:
    data = around(node("p", "PromptTemplate", template="0123456789 {q}"))

    assert len(validate_flow(data, REGISTRY, limits).nodes) == 3


def test_definition_exactly_at_the_size_limit_is_valid() -> None:
    data = minimal()

    validate_flow(data, REGISTRY, Limits(max_definition_bytes=_compact_size(data)))


def test_too_many_nodes_reports_only_the_limit() -> None:
    data = flow([IN, OUT, node("t", "TextOutput")], [edge("in", "out"), edge("in", "t")])

    assert [p.path for p in problems_of(data, Limits(max_nodes=2))] == ["$.nodes"]


# ---------------------------------------------------------------------------------------
# Security: secrets and templates


@pytest.mark.parametrize("name", [
    pytest.param("api_key", id="api_key"),
    pytest.param("openai_api_key", id="openai_api_key"),
    pytest.param("OPENAI_API_KEY", id="upper-case"),
    pytest.param("apiKey", id="camel-case"),
    pytest.param("token", id="token"),
    pytest.param("secret", id="secret"),
])
def test_secret_in_chat_model_params_points_to_the_environment(name: str) -> None:
    data = around(node("llm", "ChatModel", provider="echo", **{name: "sk-live-123456"}))

    problems = problems_of(data)

    assert_problems(problems, [(f"$.nodes[1].params.{name}", "set OPENAI_API_KEY")])
    assert f"'{name}' must not be in a flow definition" in problems[0].message
    # The secret itself is never echoed back (problems end up in responses and logs).
    assert "sk-live-123456" not in str(FlowInvalid(problems).to_dict())


@pytest.mark.parametrize(("template", "expected"), [
    pytest.param("{q} {q.__class__}", "reaches into an attribute or index", id="attribute"),
    pytest.param("{q} {q.__init__.__globals__}", "reaches into an attribute", id="globals"),
    pytest.param("{q} {q[0]}", "reaches into an attribute or index", id="index"),
    pytest.param("{q} {}", "positional field '{}' is not allowed", id="positional-empty"),
    pytest.param("{q} {0}", "positional field '{0}' is not allowed", id="positional-number"),
    pytest.param("{q:>99999999}", "has a format spec; format specs are not allowed",
                 id="format-spec"),
    pytest.param("{q:{q}}", "has a format spec", id="nested-format-spec"),
    pytest.param("{q!r}", "uses a conversion; only !s is allowed", id="conversion-r"),
    pytest.param("{q!a}", "uses a conversion; only !s is allowed", id="conversion-a"),
])
def test_unsafe_template_is_rejected(template: str, expected: str) -> None:
    data = around(node("p", "PromptTemplate", template=template))

    assert_problems(problems_of(data), [("$.nodes[1].params.template", expected)])


@pytest.mark.parametrize("template", [
    pytest.param("{q} {", id="unclosed"),
    pytest.param("{q} }", id="single-close"),
])
def test_unbalanced_braces_are_rejected(template: str) -> None:
    data = around(node("p", "PromptTemplate", template=template))

    problems = problems_of(data)

    # The template has no usable fields, so the edge into it has no input to land on either.
    assert_problems(problems, [
        ("$.nodes[1].params.template", "not a valid f-string"),
        ("$.edges[0].target_input", "takes no inputs"),
    ])
    assert "write {{ and }} for literal braces" in problems[0].message


def test_chat_prompt_template_checks_both_templates() -> None:
    data = around(node("p", "ChatPromptTemplate", system="{q.__class__}", human="{q} {0}"))

    assert_problems(problems_of(data), [
        ("$.nodes[1].params.system", "reaches into an attribute"),
        ("$.nodes[1].params.human", "positional field '{0}'"),
    ])


@pytest.mark.parametrize(("pattern", "expected"), [
    pytest.param("(a", "invalid regular expression for RE2: missing )", id="invalid"),
    pytest.param("[a-", "invalid regular expression for RE2", id="invalid-class"),
    pytest.param(r"(a)\1", "backreferences and lookaround are not supported",
                 id="backreference"),
    pytest.param("(?=a)b", "invalid regular expression for RE2", id="lookahead"),
])
def test_router_regex_that_re2_cannot_compile_is_rejected(pattern: str, expected: str) -> None:
    data = around(node("r", "ConditionalRouter", operator="regex", pattern=pattern),
                  source_output="true")

    assert_problems(problems_of(data), [("$.nodes[1].params.pattern", expected)])


@pytest.mark.parametrize(("operator", "pattern"), [
    pytest.param("regex", r"^yes\b", id="anchored"),
    pytest.param("regex", "(ab)+", id="quantified-group"),
    pytest.param("regex", "(a|b)*c", id="alternation"),
    pytest.param("regex", "[a-z]+@[a-z]+", id="classes"),
    pytest.param("contains", "(a+)+", id="not-a-regex-for-contains"),
    pytest.param("equals", "(a", id="not-a-regex-for-equals"),
    # nested repeats are harmless under RE2 (linear time); Python's re would backtrack
    pytest.param("regex", "(a+)+$", id="nested-plus"),
    pytest.param("regex", "(a|a)+$", id="ambiguous-alternation"),
])
def test_harmless_router_pattern_is_accepted(operator: str, pattern: str) -> None:
    data = around(node("r", "ConditionalRouter", operator=operator, pattern=pattern),
                  source_output="true")

    assert validate_flow(data, REGISTRY).node("r").params["pattern"] == pattern


# ---------------------------------------------------------------------------------------
# Every problem at once


def test_all_problems_are_reported_at_once() -> None:
    data = {
        "id": "bad id!", "owner": "me",
        "nodes": [
            IN,
            node("ctx", "BM25Retriever", k="3"),
            node("llm", "ChatModel", provider="bogus", api_key="sk-1"),
            node("p", "PromptTemplate", template="{q} {q.__class__}"),
            node("t", "TextSplitter", chunk_size=5, chunk_overlap=9),
            OUT,
        ],
        "edges": [edge("in", "ctx", "query"), edge("ctx", "p"), edge("p", "out")],
    }

    paths = {p.path for p in problems_of(data)}

    assert paths == {
        "$.id", "$.owner",
        "$.nodes[1].params.k",
        "$.nodes[2].params.provider", "$.nodes[2].params.api_key",
        "$.nodes[3].params.template",
        "$.nodes[4].params.chunk_overlap",
        "$.nodes[2]",  # the model's prompt input is not connected
        "$.nodes[4]",  # nor is the splitter's text input
    }


def test_node_and_edge_problems_are_reported_together() -> None:
    data = flow(
        [IN, node("llm", "ChatModle"), node("ctx", "BM25Retriever", kk=1), OUT],
        [edge("in", "llm"), edge("in", "nowhere"), edge("llm", "out"), edge("ghost", "ctx")],
        extra=True,
    )

    paths = {p.path for p in problems_of(data)}

    assert paths == {"$.extra", "$.nodes[1].type", "$.nodes[2].params",
                     "$.edges[1].target", "$.edges[3].source"}


def test_flow_invalid_carries_status_code_and_summary() -> None:
    data = around(node("ctx", "BM25Retriever", k="3", b=7), "query")

    with pytest.raises(FlowInvalid) as info:
        validate_flow(data, REGISTRY)

    error = info.value
    assert (error.status, error.code) == (422, "flow_invalid")
    assert error.message.startswith("$.nodes[1].params.")
    assert error.message.endswith("(and 1 more problem)")
    assert error.to_dict()["problems"] == [p.as_dict() for p in error.problems]


@pytest.mark.parametrize("flow_id", [
    pytest.param(None, id="missing"),
    pytest.param(42, id="number"),
])
def test_bad_id_is_reported_once(flow_id: Any) -> None:
    data = minimal()
    data["id"] = flow_id
    if flow_id is None:
        del data["id"]

    assert [p.path for p in problems_of(data)] == ["$.id"]


# ---------------------------------------------------------------------------------------
# apply_tweaks


def opened(data: dict[str, Any], **tweakable: list[str]) -> dict[str, Any]:
    """``data`` with ``tweakable`` declared: tweaks are opt-in per flow."""
    return {**data, "tweakable": tweakable}


def test_tweaks_merge_into_node_params() -> None:
    data = opened(design_example_with_query_port(), llm=["temperature", "model"], ctx=["k"])

    merged = apply_tweaks(data, {"llm": {"temperature": 1.5, "model": "other"}, "ctx": {"k": 1}})

    llm = next(n for n in merged["nodes"] if n["id"] == "llm")
    ctx = next(n for n in merged["nodes"] if n["id"] == "ctx")
    assert llm["params"] == {"provider": "echo", "model": "other", "temperature": 1.5}
    assert ctx["params"]["k"] == 1
    assert ctx["params"]["documents"] == ["Refunds take 5 days.", "Shipping is free."]
    assert validate_flow(merged, REGISTRY).node("llm").params["temperature"] == 1.5


def test_tweaks_add_params_to_a_node_without_params() -> None:
    merged = apply_tweaks(opened(minimal(), **{"in": ["input_value"]}),
                          {"in": {"input_value": "default question"}})

    assert merged["nodes"][0]["params"] == {"input_value": "default question"}


def test_tweaks_do_not_mutate_the_input() -> None:
    data = opened(design_example_with_query_port(), llm=["temperature"], **{"in": ["input_value"]})
    snapshot = copy.deepcopy(data)

    merged = apply_tweaks(data, {"llm": {"temperature": 1}, "in": {"input_value": "x"}})
    merged["nodes"][1]["params"]["documents"].append("more")

    assert data == snapshot


@pytest.mark.parametrize("tweaks", [
    pytest.param(None, id="none"),
    pytest.param({}, id="empty"),
])
def test_no_tweaks_returns_an_equal_definition(tweaks: Any) -> None:
    data = design_example_with_query_port()

    assert apply_tweaks(data, tweaks) == data


@pytest.mark.parametrize(("tweaks", "expected"), [
    pytest.param({"ghost": {"k": 1}}, [("$.tweaks.ghost", "no node 'ghost' in this flow")],
                 id="unknown-node"),
    pytest.param({"ghost": {}, "phantom": {"k": 1}},
                 [("$.tweaks.ghost", "no node 'ghost'"), ("$.tweaks.phantom", "no node 'phantom'")],
                 id="two-unknown-nodes"),
    pytest.param({"llm": "hot"}, [("$.tweaks.llm", "tweaks for a node must be an object")],
                 id="node-tweak-not-object"),
    pytest.param({"llm": [1]}, [("$.tweaks.llm", "must be an object")], id="node-tweak-list"),
    pytest.param([{"llm": {}}], [("$.tweaks", "tweaks must be an object {node_id: {param: value}}")],
                 id="list"),
    pytest.param("llm.temperature=1", [("$.tweaks", "tweaks must be an object")], id="string"),
    pytest.param(7, [("$.tweaks", "tweaks must be an object")], id="number"),
])
def test_malformed_tweaks_are_rejected(tweaks: Any, expected: list[tuple[str, str]]) -> None:
    data = design_example_with_query_port()

    with pytest.raises(FlowInvalid) as info:
        apply_tweaks(data, tweaks)

    assert_problems(info.value.problems, expected)


@pytest.mark.parametrize(("tweaks", "path", "fragment"), [
    pytest.param({"ctx": {"k": 0}}, "$.nodes[1].params.k", "less than the minimum of 1",
                 id="bad-param-value"),
    pytest.param({"llm": {"api_key": "sk-live"}}, "$.nodes[3].params.api_key", "OPENAI_API_KEY",
                 id="secret-via-tweak"),
    pytest.param({"llm": {"tempreature": 1}}, "$.nodes[3].params", "did you mean 'temperature'",
                 id="unknown-param"),
    pytest.param({"p": {"template": "{context} {question} {extra}"}}, "$.nodes[2]",
                 "required input 'extra' of node 'p'", id="new-unconnected-field"),
    pytest.param({"p": {"template": "{question.__class__}"}}, "$.nodes[2].params.template",
                 "reaches into an attribute", id="unsafe-template"),
])
def test_tweaks_that_break_the_flow_fail_validation(
    tweaks: dict[str, Any], path: str, fragment: str
) -> None:
    data = design_example_with_query_port()
    allowed = {node: list(params) for node, params in tweaks.items()}
    merged = apply_tweaks({**data, "tweakable": allowed}, tweaks)

    problems = problems_of(merged)

    assert any(p.path == path and fragment in p.message for p in problems), problems


@pytest.mark.parametrize(("tweaks", "path", "fragment"), [
    pytest.param({"llm": {"temperature": 1}}, "$.tweaks.llm.temperature",
                 "not tweakable in this flow (tweakable: none)", id="nothing-declared"),
    pytest.param({"ctx": {"documents": ["x" * 10]}}, "$.tweaks.ctx.documents",
                 "not tweakable in this flow (tweakable: k)", id="other-param-declared"),
    pytest.param({"llm": {"base_url": "http://10.0.0.1/v1"}}, "$.tweaks.llm.base_url",
                 "cannot be changed per run", id="locked"),
])
def test_tweaks_are_opt_in_per_flow(tweaks: dict[str, Any], path: str, fragment: str) -> None:
    data = opened(design_example_with_query_port(), ctx=["k"])

    with pytest.raises(FlowInvalid) as info:
        apply_tweaks(data, tweaks, REGISTRY)

    [problem] = info.value.problems
    assert problem.path == path and fragment in problem.message, problem


@pytest.mark.parametrize(("tweakable", "expected"), [
    pytest.param({"llm": ["temperature", "max_tokens"], "p": ["template"]}, [], id="valid"),
    pytest.param(["llm"], [("$.tweakable", "must be an object")], id="not-an-object"),
    pytest.param({"ghost": ["k"]}, [("$.tweakable.ghost", "no node 'ghost'")], id="unknown-node"),
    pytest.param({"llm": "temperature"}, [("$.tweakable.llm", "a list of param names")],
                 id="not-a-list"),
    pytest.param({"llm": ["temprature"]}, [("$.tweakable.llm", "has no param 'temprature'")],
                 id="unknown-param"),
    pytest.param({"llm": ["base_url"]}, [("$.tweakable.llm", "can never be tweaked")],
                 id="locked-param"),
    pytest.param({"llm": ["api_key"]}, [("$.tweakable.llm", "has no param 'api_key'")],
                 id="secret"),
])
def test_tweakable_is_validated(tweakable: Any, expected: list[tuple[str, str]]) -> None:
    data = {**design_example_with_query_port(), "tweakable": tweakable}

    if not expected:
        assert validate_flow(data, REGISTRY).raw["tweakable"] == tweakable
        return
    assert_problems(problems_of(data), expected)


# ---------------------------------------------------------------------------------------
# template_fields


@pytest.mark.parametrize(("template", "fields", "problem_fragments"), [
    pytest.param("", [], [], id="empty"),
    pytest.param("no fields here", [], [], id="literal"),
    pytest.param("Context: {context}\nQ: {question}", ["context", "question"], [], id="two"),
    pytest.param("{b} {a} {b}", ["b", "a"], [], id="first-use-order-deduplicated"),
    pytest.param("{{literal}} {x}", ["x"], [], id="escaped-braces"),
    pytest.param("{x!s}", ["x"], [], id="str-conversion-allowed"),
    pytest.param("{_private} {café}", ["_private", "café"], [], id="identifiers"),
    pytest.param("{x.y}", [], ["field '{x.y}' reaches into an attribute or index"], id="attr"),
    pytest.param("{x[0]}", [], ["field '{x[0]}' reaches into an attribute or index"], id="index"),
    pytest.param("{ x }", [], ["reaches into an attribute or index"], id="spaces"),
    pytest.param("{}", [], ["positional field '{}' is not allowed"], id="empty-field"),
    pytest.param("{1}", [], ["positional field '{1}' is not allowed"], id="numbered"),
    pytest.param("{x:>10}", ["x"], ["field '{x:>10}' has a format spec"], id="spec"),
    pytest.param("{x!r}", ["x"], ["field '{x!r}' uses a conversion"], id="repr"),
    pytest.param("{x!r:>3}", ["x"], ["has a format spec", "uses a conversion"],
                 id="spec-and-conversion"),
    pytest.param("{a} {b.c} {}", ["a"], ["'{b.c}' reaches into", "positional field '{}'"],
                 id="several-problems"),
    pytest.param("{x", [], ["not a valid f-string (expected '}' before end of string)"],
                 id="unclosed"),
    pytest.param("x}", [], ["not a valid f-string (Single '}' encountered"], id="stray-close"),
])
def test_template_fields(template: str, fields: list[str], problem_fragments: list[str]) -> None:
    got_fields, problems = template_fields(template)

    assert got_fields == fields
    assert len(problems) == len(problem_fragments), problems
    for fragment in problem_fragments:
        assert any(fragment in p for p in problems), (fragment, problems)


# ---------------------------------------------------------------------------------------
# Structure: the flows package stays pure; nothing in the engine evaluates code


FORBIDDEN_IN_FLOWS = {"flask", "sqlalchemy", "requests", "httpx", "redis", "importlib"}


def _python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def imported_roots(tree: ast.AST) -> set[str]:
    """Top-level package names imported anywhere in ``tree`` (function bodies included)."""
    roots: set[str] = set()
    for item in ast.walk(tree):
        if isinstance(item, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in item.names)
        elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
            roots.add(item.module.split(".")[0])
    return roots


def dynamic_code_calls(tree: ast.AST) -> list[str]:
    """``eval(...)``, ``exec(...)``, ``__import__(...)``, ``importlib.import_module(...)`` and
    ``import_module(...)`` imported from importlib, as ``name@line``."""
    from_importlib = {
        alias.asname or alias.name
        for item in ast.walk(tree)
        if isinstance(item, ast.ImportFrom) and item.module == "importlib"
        for alias in item.names
        if alias.name == "import_module"
    }
    found = []
    for item in ast.walk(tree):
        if not isinstance(item, ast.Call):
            continue
        func = item.func
        if isinstance(func, ast.Name) and func.id in {"eval", "exec", "__import__"} | from_importlib:
            found.append(f"{func.id}@{item.lineno}")
        elif (isinstance(func, ast.Attribute) and func.attr == "import_module"
              and isinstance(func.value, ast.Name) and func.value.id == "importlib"):
            found.append(f"importlib.import_module@{item.lineno}")
    return found


@pytest.mark.parametrize(("source", "expected"), [
    pytest.param("eval('1')", ["eval@1"], id="eval"),
    pytest.param("x = 1\nexec(code)", ["exec@2"], id="exec"),
    pytest.param("import importlib\nimportlib.import_module(name)",
                 ["importlib.import_module@2"], id="import-module"),
    pytest.param("from importlib import import_module as im\nim(name)", ["im@2"], id="aliased"),
    pytest.param("__import__('os')", ["__import__@1"], id="dunder-import"),
    pytest.param("# eval(x)\ns = 'exec(y)'\nobj.eval()", [], id="comments-strings-methods"),
])
def test_dynamic_code_detector(source: str, expected: list[str]) -> None:
    assert dynamic_code_calls(ast.parse(source)) == expected


def test_imported_roots_detector() -> None:
    source = "import a.b\nfrom c.d import e\nfrom . import f\ndef g():\n    import flask\n"

    assert imported_roots(ast.parse(source)) == {"a", "c", "flask"}


def test_flows_package_imports_no_web_sql_network_or_dynamic_import_modules() -> None:
    files = _python_files(ENGINE_DIR / "flows")
    assert {f.name for f in files} >= {"validate.py", "compile.py", "templates.py", "model.py"}

    offenders = {
        f.name: sorted(imported_roots(ast.parse(f.read_text(), str(f))) & FORBIDDEN_IN_FLOWS)
        for f in files
    }

    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_no_engine_module_evaluates_or_dynamically_imports_code() -> None:
    files = _python_files(ENGINE_DIR)
    assert len(files) > 10

    offenders = {
        str(f.relative_to(ENGINE_DIR)): dynamic_code_calls(ast.parse(f.read_text(), str(f)))
        for f in files
    }

    assert {name: calls for name, calls in offenders.items() if calls} == {}


def test_loading_flows_pulls_in_no_web_sql_or_openai_client() -> None:
    # Transitively (a fresh interpreter): validating and compiling an echo flow must not load
    # Flask, SQLAlchemy, Redis, or the OpenAI client (imported lazily by ChatModel openai).
    script = (
        "import sys\n"
        "from flow_engine.components import default_registry\n"
        "from flow_engine.flows.compile import compile_flow\n"
        "from flow_engine.flows.model import FlowVersion\n"
        "from flow_engine.flows.validate import validate_flow\n"
        f"data = {design_example_with_query_port()!r}\n"
        "reg = default_registry()\n"
        "compile_flow(FlowVersion('f', 1, validate_flow(data, reg)), reg)\n"
        "bad = ('flask', 'sqlalchemy', 'redis', 'openai', 'langchain_openai')\n"
        "print(sorted(m for m in bad if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)

    assert done.stdout.strip() == "[]"
