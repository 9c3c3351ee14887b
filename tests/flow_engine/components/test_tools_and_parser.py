"""Tool nodes on their own (what the model sees, what they answer) and the Parser node."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from flow_engine.components import default_registry
from flow_engine.components.base import BuildContext, Limits
from flow_engine.components.subflows import MAX_DEPTH, EngineSubflows, RunContext, SubflowRefused
from flow_engine.components.template_parser import Parser
from flow_engine.components.tools import (
    BM25SearchTool,
    Calculator,
    FlowTool,
    KnowledgeSearchTool,
    tool_name,
)
from flow_engine.errors import FlowInvalid
from flow_engine.flows.validate import validate_flow

REGISTRY = default_registry()


def call(tool: Any, **args: Any) -> Any:
    return tool.invoke({"name": tool.name, "args": args, "id": "call-1", "type": "tool_call"})


def make(component: Any, **params: Any) -> Any:
    return component.make_tool("n", component.with_defaults(params), BuildContext())


def test_the_calculator_as_the_model_sees_it() -> None:
    tool = make(Calculator(), name="math", description="Does sums.")

    assert convert_to_openai_tool(tool)["function"] == {
        "name": "math", "description": "Does sums.",
        "parameters": {"type": "object", "required": ["expression"], "properties": {
            "expression": {"type": "string", "maxLength": 500,
                           "description": "an arithmetic expression, e.g. (12 + 30) * 2 / 7"}}}}
    assert call(tool, expression="2^10").content == "1024"
    assert str(tool) == "tool math"  # what its node_finished event shows


@pytest.mark.parametrize(("args", "answer"), [
    pytest.param({}, "invalid arguments: expression: Field required", id="missing"),
    pytest.param({"expression": "1" * 600},
                 "invalid arguments: expression: String should have at most 500 characters",
                 id="too-long"),
    pytest.param({"expression": "os.system('x')"}, "cannot compute", id="not-arithmetic"),
])
def test_calculator_refusals_are_answers_never_tracebacks(args: dict[str, Any], answer: str) -> None:
    result = call(make(Calculator()), **args)
    assert result.status == "error" and result.content.startswith(answer)


def test_bm25_search_answers_with_numbered_passages() -> None:
    tool = make(BM25SearchTool(), documents=["Refunds take 5 days.", "Shipping is free.",
                                             {"text": "Refunds need a receipt.", "metadata": {}}])

    found = call(tool, query="how do refunds work")

    assert found.content == "[1] Refunds take 5 days.\n\n[2] Refunds need a receipt."
    assert found.artifact == {"documents": 2}
    assert call(tool, query="zebra").content == "nothing found"


class Bases:
    """A knowledge lookup (flow_engine/components/knowledge.py's protocol) with one base."""

    def problem(self, kb_ref: str) -> str | None:
        return None if kb_ref == "handbook" else f"no knowledge base '{kb_ref}'"

    def search(self, kb_ref: str, request: Any) -> list[Any]:
        from flow_engine.knowledge.model import Hit

        return [Hit(text=f"about {request.query}", document="guide.md", document_id="d1",
                    chunk=0, score=1.0, metadata={})][:request.k]


def test_knowledge_search_is_checked_and_searched_through_the_engines_lookup() -> None:
    component = KnowledgeSearchTool()
    flow = {"id": "k", "nodes": [{"id": "in", "type": "ChatInput"},
                                 {"id": "kb", "type": "KnowledgeSearchTool",
                                  "params": {"knowledge_id": "missing"}},
                                 {"id": "out", "type": "ChatOutput"}],
            "edges": [{"source": "in", "target": "out"}]}

    with pytest.raises(FlowInvalid, match=r"\$\.nodes\[1\]\.params\.knowledge_id: no knowledge"):
        validate_flow(flow, REGISTRY, Limits(extra={"knowledge": Bases()}))
    tool = component.make_tool("kb", component.with_defaults({"knowledge_id": "handbook", "k": 1}),
                               BuildContext(extra={"knowledge": Bases()}))

    assert call(tool, query="refunds").content == "[1] about refunds"


def test_a_flow_tool_without_the_engines_hook_says_so() -> None:
    tool = make(FlowTool(), flow_id="orders", description="Looks orders up.")

    assert tool.name == "flow_orders"
    assert call(tool, input="order 42").content == (
        "running flows from flows is not available on this engine")


@pytest.mark.parametrize(("text", "name"), [
    ("orders", "orders"), ("my flow.v2", "my_flow_v2"), ("", "tool"), ("ünïcode", "_n_code"),
    ("x" * 80, "x" * 64),
])
def test_tool_names_are_what_openai_accepts(text: str, name: str) -> None:
    assert tool_name(text) == name


class NoFlows:
    """A flow service that must not be reached."""

    def resolve(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("resolved a flow that should have been refused first")

    def compiled(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("compiled a flow that should have been refused first")


def test_subflows_nest_at_most_max_depth_deep() -> None:
    deep = RunContext(flow_id="d", chain=tuple("abcd"[:MAX_DEPTH]))

    with pytest.raises(SubflowRefused, match="flows may nest 4 deep at most: a → b → c → d → e"):
        EngineSubflows(NoFlows()).run("e", "hi", deep)


# -- Parser ------------------------------------------------------------------------------------


def parse(value: Any, **params: Any) -> str:
    component = Parser()
    return component.build("p", component.with_defaults(params), BuildContext()).invoke(value)


@pytest.mark.parametrize(("value", "params", "text"), [
    pytest.param([Document(page_content="A", metadata={"title": "t1", "score": 0.5}),
                  Document(page_content="B", metadata={"title": "t2"})],
                 {"template": "{title}: {text} ({score})"}, "t1: A (0.5)\nt2: B ()", id="documents"),
    pytest.param({"name": "Ada", "tags": ["x", "y"]}, {"template": "{name} {tags}"},
                 'Ada ["x", "y"]', id="object"),
    pytest.param([AIMessage("hello")], {"template": "{sender}: {text}"}, "ai: hello", id="message"),
    pytest.param("plain", {"template": "<{text}>"}, "<plain>", id="text"),
    pytest.param(["a", "b"], {"template": "- {text}", "sep": " | "}, "- a | - b", id="sep"),
    pytest.param(None, {}, "", id="nothing"),
    pytest.param([Document(page_content="A"), {"k": 1}, "s"], {"mode": "stringify"},
                 'A\n{"k": 1}\ns', id="stringify"),
    pytest.param([{"x": "{y}"}], {"template": "{x}{{literal}}"}, "{y}{literal}", id="braces"),
])
def test_the_parser_fills_its_template_per_row(value: Any, params: dict[str, Any], text: str) -> None:
    assert parse(value, **params) == text


@pytest.mark.parametrize("template", ["{x.__class__}", "{x[0]}", "{}", "{x:>99999999}", "{x!r}"])
def test_parser_templates_only_substitute(template: str) -> None:
    flow = {"id": "p", "nodes": [{"id": "in", "type": "ChatInput"},
                                 {"id": "p", "type": "Parser", "params": {"template": template}},
                                 {"id": "out", "type": "ChatOutput"}],
            "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "out"}]}
    with pytest.raises(FlowInvalid, match=r"\$\.nodes\[1\]\.params\.template"):
        validate_flow(flow, REGISTRY)
