"""Tool nodes: what an ``Agent`` may call. Each is a node whose output is a LangChain tool,
connected to one of the agent's ``tools.<slot>`` inputs; the agent offers it to the model
by its ``name`` and ``description`` and runs it when the model asks.

- ``Calculator``: arithmetic by a real grammar (``components/calculator.py``), never ``eval``.
- ``FlowTool``: runs another flow's live version with the model's text as its input
  (``components/subflows.py``: inside the calling run, depth-limited, no cycles).
- ``BM25SearchTool`` / ``KnowledgeSearchTool``: a BM25Retriever's or a KnowledgeRetriever's
  search, with the model writing the query. They are tools of their own rather than the
  retrievers wired to an agent, because a retriever node runs as a step of the flow with
  its ``query`` input required, and a tool's query comes from the model at run time.

Tools are built once per compiled version and shared by its runs; whatever is per run
(the tenant, the cancel token) comes from the config each call is given. A tool's own
failure (a bad expression, an unknown flow) goes back to the model as the tool's answer
(``status: error``) so that it can correct itself; cancelling the run is never swallowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.callbacks import CallbackManagerForToolRun
from langchain_core.documents import Document
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, Field

from flow_engine.components.base import BuildContext, Component, Limits, NodeFunction
from flow_engine.components.calculator import MAX_CHARS, CalculatorError, evaluate
from flow_engine.components.retrievers import BM25Retriever, FlowBM25Retriever, as_documents
from flow_engine.components.subflows import SUBFLOWS, SubflowRefused, run_context
from flow_engine.errors import RunCancelled

TOOL_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$",
             "description": "the name the model calls it by"}
MAX_INPUT_CHARS = 100_000


def _description(default: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": 2000, "default": default,
            "description": "tells the model when to use it"}


def _invalid_arguments(error: Any) -> str:
    """What the model is told when its arguments do not fit the tool (never the values)."""
    try:
        parts = [f"{'.'.join(map(str, e.get('loc', ()))) or 'arguments'}: {e.get('msg')}"
                 for e in error.errors()]
    except Exception:  # a pydantic v1 error, or anything else
        parts = []
    return "invalid arguments: " + ("; ".join(parts) if parts else "they do not fit the tool")


class FlowgateTool(BaseTool):
    """A tool of a tool node: errors go back to the model, never a traceback."""

    handle_tool_error: bool = True
    handle_validation_error: Any = _invalid_arguments

    def __str__(self) -> str:  # what the tool node's node_finished event shows
        return f"tool {self.name}"


class _ToolNode(Component):
    """A node that hands an agent one tool (built once; the node's output each run)."""

    outputs = ("tool",)

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        tool = self.make_tool(node_id, params, ctx)
        return NodeFunction(lambda _input: tool, name=node_id)

    def make_tool(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> BaseTool:
        raise NotImplementedError


# -- Calculator ------------------------------------------------------------------------------


class _ExpressionArgs(BaseModel):
    expression: str = Field(max_length=MAX_CHARS,
                            description="an arithmetic expression, e.g. (12 + 30) * 2 / 7")


class CalculatorTool(FlowgateTool):
    args_schema: type[BaseModel] = _ExpressionArgs

    def _run(self, expression: str) -> str:
        try:
            return evaluate(expression)
        except CalculatorError as exc:
            raise ToolException(f"cannot compute {expression[:80]!r}: {exc}") from None


class Calculator(_ToolNode):
    type_name = "Calculator"
    display_name = "Calculator"
    description = ("A tool for an Agent: exact arithmetic (+ - * / // % ^, parentheses), "
                   "parsed by a grammar, never evaluated as code.")
    params_schema = {
        "type": "object",
        "properties": {
            "name": {**TOOL_NAME, "default": "calculator"},
            "description": _description(
                "Computes an arithmetic expression exactly (+ - * / // % ^ and parentheses). "
                "Use it for every calculation."),
        },
    }

    def make_tool(self, node_id, params, ctx) -> BaseTool:
        return CalculatorTool(name=params["name"], description=params["description"])


# -- FlowTool --------------------------------------------------------------------------------


class _FlowInput(BaseModel):
    input: str = Field(max_length=MAX_INPUT_CHARS, description="the message to send the flow")


class FlowRunnerTool(FlowgateTool):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    args_schema: type[BaseModel] = _FlowInput
    response_format: str = "content_and_artifact"
    flow_id: str
    subflows: Any = None

    def _run(self, input: str, config: RunnableConfig,
             run_manager: CallbackManagerForToolRun | None = None) -> tuple[str, dict[str, Any]]:
        if self.subflows is None:
            raise ToolException("running flows from flows is not available on this engine")
        parent = run_context(config)
        try:
            # the tool call's handlers, its run id their parent: the sub-flow's spans hang there
            below = run_manager.get_child() if run_manager is not None else None
            result = self.subflows.run(self.flow_id, input, parent, below)
        except RunCancelled:
            raise
        except SubflowRefused as exc:
            raise ToolException(str(exc)) from None
        except Exception as exc:  # the flow failed: the model hears why and may go on
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ToolException(f"flow '{self.flow_id}' failed: {type(exc).__name__}"
                                + (f": {detail}" if detail else "")) from None
        return result.output, {"flow_id": result.flow_id, "version": result.version,
                               "usage": result.usage}


class FlowTool(_ToolNode):
    type_name = "FlowTool"
    display_name = "Flow Tool"
    description = ("A tool for an Agent: runs another flow's live version with the model's "
                   "message as its input and answers with that flow's output.")
    params_schema = {
        "type": "object",
        "required": ["flow_id", "description"],
        "properties": {
            "flow_id": {"type": "string", "minLength": 1, "maxLength": 200,
                        "description": "the flow's id or name"},
            "description": _description("Runs a flow."),
            "name": {**TOOL_NAME, "description": "default: flow_<flow_id>"},
        },
    }

    def make_tool(self, node_id, params, ctx) -> BaseTool:
        name = params.get("name") or tool_name("flow_" + params["flow_id"])
        return FlowRunnerTool(name=name, description=params["description"],
                              flow_id=params["flow_id"], subflows=ctx.extra.get(SUBFLOWS))


def tool_name(text: str) -> str:
    """``text`` as a tool name the OpenAI API accepts (``[A-Za-z0-9_-]{1,64}``)."""
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in text)
    return cleaned[:64] or "tool"


# -- search tools ----------------------------------------------------------------------------


class _QueryArgs(BaseModel):
    query: str = Field(max_length=4000, description="what to search for")


class SearchTool(FlowgateTool):
    """Any LangChain retriever as a tool: the top passages, numbered, as the answer."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    args_schema: type[BaseModel] = _QueryArgs
    response_format: str = "content_and_artifact"
    retriever: Any

    def _run(self, query: str, config: RunnableConfig) -> tuple[str, dict[str, Any]]:
        documents: list[Document] = self.retriever.invoke(query, config)
        if not documents:
            return "nothing found", {"documents": 0}
        text = "\n\n".join(f"[{i}] {doc.page_content}" for i, doc in enumerate(documents, 1))
        return text, {"documents": len(documents)}


class BM25SearchTool(_ToolNode):
    type_name = "BM25SearchTool"
    display_name = "BM25 Search Tool"
    description = "A tool for an Agent: BM25 search over the documents in params."
    params_schema = {
        "type": "object",
        "properties": {
            "name": {**TOOL_NAME, "default": "search"},
            "description": _description("Searches the reference documents for passages about "
                                        "a query."),
            **BM25Retriever.params_schema["properties"],
        },
    }

    def make_tool(self, node_id, params, ctx) -> BaseTool:
        retriever = FlowBM25Retriever(k=params["k"], k1=params["k1"], b=params["b"],
                                      base_documents=as_documents(params["documents"]))
        return SearchTool(name=params["name"], description=params["description"],
                          retriever=retriever)


def _knowledge_component() -> Any:
    from flow_engine.components.knowledge import KnowledgeRetriever

    return KnowledgeRetriever()


class KnowledgeSearchTool(_ToolNode):
    """Register it together with KnowledgeRetriever (it searches through the same lookup)."""

    type_name = "KnowledgeSearchTool"
    display_name = "Knowledge Search Tool"
    description = "A tool for an Agent: searches a knowledge base by meaning, keywords or both."

    def __init__(self) -> None:
        self._retriever = _knowledge_component()
        self.params_schema = {
            "type": "object",
            "required": ["knowledge_id"],
            "properties": {
                "name": {**TOOL_NAME, "default": "knowledge_search"},
                "description": _description("Searches the knowledge base for passages about "
                                            "a query."),
                **self._retriever.params_schema["properties"],
            },
        }
        super().__init__()

    def check_semantics(self, params: Mapping[str, Any], limits: Limits):
        yield from self._retriever.check_semantics(params, limits)

    def make_tool(self, node_id, params, ctx) -> BaseTool:
        own = {k: params[k] for k in ("knowledge_id", "k", "mode")}
        retriever = self._retriever.build(node_id, own, ctx)
        return SearchTool(name=params["name"], description=params["description"],
                          retriever=retriever)
