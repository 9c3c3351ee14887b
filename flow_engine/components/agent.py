"""Agent: a model that may call tools, in a loop, until it answers in text.

Each step is one Chat Completions call with the connected tools offered (``tools``; the
engine's own client, ``openai_compat``). When the answer holds ``tool_calls``, each call
runs (in order) and its result goes back as a ``tool`` message; the next step sees them.
The first answer without tool calls is the node's output. ``max_iterations`` bounds the
model calls: when the last one still asks for tools, the run fails with
``agent_iteration_limit`` naming the node.

Inputs: ``input`` (the user's message), optionally ``system_prompt`` (overrides the param)
and ``history`` (a ChatHistory's text, added to the system message), and one input
``tools.<slot>`` per name in the ``tools`` param, each fed by a tool node (components/tools.py).
One input takes one edge, so the slots name the tools' places: ``"tools": ["calc", "orders"]``
and edges ``{"source": "calc", "target": "agent", "target_input": "tools.calc"}``.

The model params are ChatModel's and obey the same rules: no key in the definition,
``base_url`` only to an allowed provider origin (flow_engine/egress.py), ``provider`` and
``base_url`` never tweakable. With ``provider: echo`` the agent never calls a tool.

Events: model calls and tool runs are child runs of the node, so the run's events name the
node: its tokens (every step's, streamed), and a ``tool_call`` and ``tool_result`` per tool
run from LangChain's tool callbacks (the runner's recorder turns them into events). The
usage of every call is summed, on the output message and in the run's usage. A cancelled
run stops at the next step, tool or token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
    get_callback_manager_for_config,
    patch_config,
    set_config_context,
)
from langchain_core.tools import BaseTool, ToolException
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel

from flow_engine.components.base import BuildContext, Component, Limits, Port
from flow_engine.components.models import _SECRET_PARAMS, ChatModel
from flow_engine.components.subflows import add_usage, artifact_usage, run_context
from flow_engine.errors import RunCancelled, RunFailed

STREAM_TOKENS = "flowgate_stream_tokens"  # = flows.compile.STREAM_TOKENS (compile imports us)
MAX_TOOL_RESULT_CHARS = 16_000  # of one tool's answer, as the model sees it
MAX_CALLS_PER_STEP = 16
HISTORY_HEADING = "Earlier messages of this conversation:"
_MODEL = ChatModel()
_MODEL_PARAMS = tuple(ChatModel.params_schema["properties"])
_OWN_PARAMS = ("system_prompt", "max_iterations", "tools")
_SLOT = "^[A-Za-z0-9_]{1,40}$"


class AgentIterationLimit(RunFailed):
    code = "agent_iteration_limit"


class Agent(Component):
    type_name = "Agent"
    display_name = "Agent"
    description = ("A model that calls tools (Calculator, FlowTool, search tools) in a loop "
                   "until it can answer; tools connect to its tools.<slot> inputs.")
    outputs = ("response",)
    takes_mapping = True
    input_ports = (
        Port("input", coerce="text", description="the user's message"),
        Port("system_prompt", required=False, coerce="text",
             description="overrides the system_prompt param"),
        Port("history", required=False, coerce="text",
             description="earlier turns (a ChatHistory), added to the system message"),
    )
    locked_params = frozenset({"provider", "base_url"})
    params_schema = {
        "type": "object",
        "properties": {
            **ChatModel.params_schema["properties"],
            "system_prompt": {"type": "string", "default": ""},
            "max_iterations": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10,
                               "description": "model calls at most"},
            "tools": {"type": "array", "maxItems": MAX_CALLS_PER_STEP, "uniqueItems": True,
                      "items": {"type": "string", "pattern": _SLOT}, "default": [],
                      "description": "tool slots: each is an input tools.<slot> fed by a tool node"},
        },
    }

    def inputs(self, params: Mapping[str, Any]) -> tuple[Port, ...]:
        slots = params.get("tools")
        extra = tuple(Port(f"tools.{slot}", coerce="any", description="a tool node")
                      for slot in slots if isinstance(slot, str)) if isinstance(slots, list) else ()
        return self.input_ports + extra

    def check_params(self, params: Mapping[str, Any], limits: Limits):
        known = self.params_schema["properties"]
        for key in params:
            if key not in known and key.lower() not in _SECRET_PARAMS:
                yield "", self._unknown_param_message(key, known)
        model = {k: v for k, v in params.items() if k in _MODEL_PARAMS or k.lower() in _SECRET_PARAMS}
        yield from _MODEL.check_params(model, limits)  # no keys, the schema, provider egress
        own = {k: params[k] for k in _OWN_PARAMS if k in params}
        schema_only = {"type": "object", "properties": {
            k: self.params_schema["properties"][k] for k in own}}
        yield from _schema_problems(schema_only, own)
        prompt = params.get("system_prompt")
        if isinstance(prompt, str) and len(prompt) > limits.max_template_chars:
            yield ".system_prompt", (f"system_prompt is {len(prompt)} characters; the limit is "
                                     f"{limits.max_template_chars}")

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        model = _MODEL.build(node_id, {k: params[k] for k in _MODEL_PARAMS if k in params}, ctx)
        return AgentRunnable(node_id=node_id, model=model, system_prompt=params["system_prompt"],
                             max_iterations=params["max_iterations"], slots=tuple(params["tools"]),
                             offers_tools=params["provider"] == "openai")


def _schema_problems(schema: dict[str, Any], params: Mapping[str, Any]):
    from jsonschema import Draft202012Validator

    for error in Draft202012Validator(schema).iter_errors(dict(params)):
        sub = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        yield sub, error.message


class AgentRunnable(Runnable[dict, AIMessage]):
    """The tool-calling loop of one Agent node (see the module docstring)."""

    def __init__(self, *, node_id: str, model: BaseChatModel, system_prompt: str,
                 max_iterations: int, slots: tuple[str, ...], offers_tools: bool) -> None:
        self.name = node_id
        self.model = model
        self.system_prompt = system_prompt
        self.max_iterations = max_iterations
        self.slots = slots
        self.offers_tools = offers_tools

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        config = ensure_config(config)
        run_manager = get_callback_manager_for_config(config).on_chain_start(
            None, {k: v for k, v in input.items() if not k.startswith("tools.")},
            name=config.get("run_name") or self.name, run_id=config.pop("run_id", None))
        try:
            answer = self._loop(input, config, run_manager)
        except BaseException as exc:
            run_manager.on_chain_error(exc)
            raise
        run_manager.on_chain_end(answer)
        return answer

    def _loop(self, input: dict, config: RunnableConfig, run_manager: Any) -> AIMessage:
        tools = self._tools(input)
        messages = self._messages(input)
        # The tools go with each call as request fields, not through bind_tools: a bound
        # model merges callback managers through a set, so with more than one handler (the
        # recorder and a caller's) their order would change from call to call.
        offered = {"tools": [convert_to_openai_tool(t) for t in tools.values()]} if (
            tools and self.offers_tools) else {}
        streamed = {"stream": True} if (config.get("configurable") or {}).get(STREAM_TOKENS) else {}
        context = run_context(config)
        usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "llm_calls": 0}
        tool_runs = 0
        for step in range(1, self.max_iterations + 1):
            self._check_cancel(context)
            reply = _call(self.model, messages,
                          patch_config(config, callbacks=run_manager.get_child()),
                          **streamed, **offered)
            add_usage(usage, reply.usage_metadata or {}, calls=1)
            calls = _calls(reply)
            if not calls:
                return AIMessage(content=reply.text, usage_metadata={
                    k: usage[k] for k in ("input_tokens", "output_tokens", "total_tokens")},
                    response_metadata={"model_calls": step, "tool_calls": tool_runs,
                                       "llm_calls": usage["llm_calls"]})
            messages.append(reply)
            for position, call in enumerate(calls):
                self._check_cancel(context)
                result = self._run_tool(tools, call, position, config, run_manager)
                add_usage(usage, artifact_usage(result))
                messages.append(result)
                tool_runs += 1
        raise AgentIterationLimit(
            f"agent '{self.name}' made {self.max_iterations} model calls (max_iterations) and "
            "the model still asked for tools; raise max_iterations or make the task smaller")

    def _tools(self, input: Mapping[str, Any]) -> dict[str, BaseTool]:
        tools: dict[str, BaseTool] = {}
        for slot in self.slots:
            tool = input.get(f"tools.{slot}")
            if not isinstance(tool, BaseTool):
                raise RunFailed(f"agent '{self.name}': input 'tools.{slot}' got "
                                f"{type(tool).__name__}, not a tool; connect a tool node "
                                "(Calculator, FlowTool, BM25SearchTool, KnowledgeSearchTool)")
            if tool.name in tools:
                raise RunFailed(f"agent '{self.name}': two tools are named '{tool.name}'; give "
                                "each tool node its own name param")
            tools[tool.name] = tool
        return tools

    def _messages(self, input: Mapping[str, Any]) -> list[BaseMessage]:
        system = input.get("system_prompt") or self.system_prompt
        history = input.get("history")
        if history:
            system = f"{system}\n\n{HISTORY_HEADING}\n{history}" if system else (
                f"{HISTORY_HEADING}\n{history}")
        messages: list[BaseMessage] = [SystemMessage(system)] if system else []
        messages.append(HumanMessage(input.get("input") or ""))
        return messages

    def _run_tool(self, tools: Mapping[str, BaseTool], call: dict[str, Any], position: int,
                  config: RunnableConfig, run_manager: Any) -> ToolMessage:
        tool = tools.get(call["name"])
        if position >= MAX_CALLS_PER_STEP:
            tool = _Refused(name=call["name"] or "unknown", reason=(
                f"more than {MAX_CALLS_PER_STEP} tool calls at once; call fewer"))
        elif call.get("error"):
            tool = _Refused(name=call["name"] or "unknown", reason=call["error"])
        elif tool is None:
            tool = _Refused(name=call["name"] or "unknown", reason=(
                f"there is no tool named {call['name']!r} (tools: {', '.join(tools) or 'none'})"))
        child = patch_config(config, callbacks=run_manager.get_child())
        result = _call(tool, {"name": tool.name, "args": call["args"], "id": call["id"],
                              "type": "tool_call"}, child)
        if not isinstance(result, ToolMessage):  # a tool that ignored the call id
            result = ToolMessage(str(result), tool_call_id=call["id"], name=tool.name)
        if isinstance(result.content, str) and len(result.content) > MAX_TOOL_RESULT_CHARS:
            result.content = result.content[:MAX_TOOL_RESULT_CHARS] + " [cut]"
        return result

    @staticmethod
    def _check_cancel(context: Any) -> None:
        if context.cancelled:
            raise RunCancelled(f"run cancelled: {context.cancel.reason}")


def _call(runnable: Runnable, input: Any, config: RunnableConfig, **kwargs: Any) -> Any:
    """``runnable.invoke`` as a child run of this node, with the config also made the current
    one (as RunnableSequence does): LangChain merges the current config into what it is
    given, and would otherwise name the call after the node and parent it to the graph."""
    with set_config_context(config) as context:
        return context.run(runnable.invoke, input, config, **kwargs)


def _calls(reply: AIMessage) -> list[dict[str, Any]]:
    """The reply's tool calls; malformed ones too, each to be answered with an error."""
    calls = [dict(c) for c in reply.tool_calls]
    for bad in reply.invalid_tool_calls:
        calls.append({"name": bad.get("name"), "args": {}, "id": bad.get("id"),
                      "error": "the arguments are not a JSON object"})
    return calls


class _NoArgs(BaseModel):
    pass


class _Refused(BaseTool):
    """Stands in for a call that cannot run, so that it is answered (and reported) like any."""

    description: str = "a tool call that cannot run"
    args_schema: type[BaseModel] = _NoArgs
    handle_tool_error: bool = True
    reason: str

    def _run(self, **_ignored: Any) -> str:
        raise ToolException(self.reason)

