"""A run's OpenTelemetry spans (when the engine exports them: ``flowgate/common/otel.py``).

    <the request's server span>
      run <flow>                        flowgate.flow.id, .version, .run.id, session.id
        node <id>                       flowgate.node.id, .type; skipped: a span of no length
          chat                          gen_ai.* (OpenTelemetry GenAI semantic conventions),
                                        the first token as an event
          execute_tool                  an Agent's tool call (gen_ai.tool.name)
            run <sub-flow>              a FlowTool's flow (flowgate.parent_flow.id), its
              node <id>                 nodes and LLM calls as above
                chat

:class:`RunSpans` is one more LangChain callback handler next to the runner's recorder
(``runs/runner.py``), mapping LangChain's runs to nodes the same way: the graph's root run
is the flow, its direct children named like a node are the nodes, and anything below a node
belongs to it. The run span's parent is the span of the request that started the run,
captured when the run was prepared (a streamed run executes in a greenlet of its own).
A flow a FlowTool runs gets a RunSpans of its own under the tool's span
(:meth:`RunSpans.trace_subflow`, asked by ``components/subflows.py``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from opentelemetry.context import Context
from opentelemetry.trace import Span

from flowgate.common.otel import Telemetry, ended_with


class RunSpans(BaseCallbackHandler):
    run_inline = True  # spans start and end in the order things happen
    raise_error = False  # a tracing problem never fails a run

    def __init__(self, telemetry: Telemetry, parent: Span | Context | None, *, flow_id: str,
                 version: int, run_id: str, node_types: Mapping[str, str],
                 session_id: str | None, tenant: str | None,
                 parent_flow_id: str | None = None) -> None:
        self._t = telemetry
        self._types = node_types
        self._flow_id, self._run_id, self._session, self._tenant = (flow_id, run_id,
                                                                    session_id, tenant)
        self.run = telemetry.child(parent, f"run {flow_id}", attributes={
            "flowgate.flow.id": flow_id, "flowgate.flow.version": version,
            "flowgate.run.id": run_id, "flowgate.tenant": tenant or "",
            **({"session.id": session_id} if session_id else {}),
            **({"flowgate.parent_flow.id": parent_flow_id} if parent_flow_id else {})})
        self._root: UUID | None = None
        self._owner: dict[UUID, Span] = {}  # every LangChain run inside a node → its span
        self._open: dict[Any, Span] = {}  # spans started here and not yet ended
        self._llm_started: dict[Any, float] = {}  # LLM calls without a first token yet
        self._nodes_seen: set[str] = set()

    # -- the run ---------------------------------------------------------------------------

    def end(self, status: str, error: str | None = None,
            usage: Mapping[str, int] | None = None) -> None:
        """End what is still open (a failed or cancelled run's node and LLM spans), give
        the nodes that never ran a span saying so, and end the run span."""
        for span in reversed(list(self._open.values())):
            ended_with(span, error=error or status)
        self._open.clear()
        now = time.time_ns()
        for node, node_type in self._types.items():
            if node not in self._nodes_seen and status == "succeeded":
                skipped = self._t.child(self.run, f"node {node}", start_time=now, attributes={
                    "flowgate.node.id": node, "flowgate.node.type": node_type,
                    "flowgate.node.skipped": True})
                skipped.end(end_time=now)
        attrs = {f"flowgate.usage.{k}": v for k, v in (usage or {}).items()}
        ended_with(self.run, error=error, **{"flowgate.run.status": status}, **attrs)

    def trace_subflow(self, tool_run_id: UUID | None, *, flow_id: str, version: int,
                      node_types: Mapping[str, str]) -> RunSpans:
        """The spans of a flow that the tool call ``tool_run_id`` runs (a FlowTool): a
        handler of its own, its run span a child of the tool's span. Its caller ends it."""
        parent = self._open.get(_tool_key(tool_run_id)) if tool_run_id else None
        return RunSpans(self._t, parent or self._owner.get(tool_run_id) or self.run,
                        flow_id=flow_id, version=version, run_id=self._run_id,
                        node_types=node_types, session_id=self._session, tenant=self._tenant,
                        parent_flow_id=self._flow_id)

    # -- LangChain callbacks -----------------------------------------------------------------

    def _enter(self, run_id: UUID, parent_run_id: UUID | None, name: str | None) -> Span | None:
        """The span that owns ``run_id``: a new node span when it is a node, else its
        parent's (None: outside any node)."""
        if parent_run_id is None:
            self._root = run_id
            return None
        if parent_run_id == self._root and name in self._types:
            self._nodes_seen.add(name)
            span = self._t.child(self.run, f"node {name}", attributes={
                "flowgate.node.id": name, "flowgate.node.type": self._types[name],
                "flowgate.node.skipped": False})
            self._owner[run_id] = self._open[run_id] = span
            return span
        owner = self._owner.get(parent_run_id)
        if owner is not None:
            self._owner[run_id] = owner
        return owner

    def _leave(self, run_id: UUID, error: BaseException | None = None) -> None:
        self._owner.pop(run_id, None)
        span = self._open.pop(run_id, None)
        if span is not None:
            ended_with(span, error=type(error).__name__ if error is not None else None)

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, **kw):
        self._enter(run_id, parent_run_id, kw.get("name"))

    def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kw):
        self._enter(run_id, parent_run_id, kw.get("name"))

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kw):
        self._llm_start(run_id, parent_run_id, kw)

    def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, **kw):
        self._llm_start(run_id, parent_run_id, kw, operation="text_completion")

    def _llm_start(self, run_id: UUID, parent_run_id: UUID | None, kw: dict[str, Any],
                   operation: str = "chat") -> None:
        owner = self._enter(run_id, parent_run_id, kw.get("name"))
        meta = kw.get("metadata") or {}
        params = kw.get("invocation_params") or {}
        model = meta.get("ls_model_name") or params.get("model") or params.get("model_name")
        provider = meta.get("ls_provider") or "unknown"
        attrs = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
                 "gen_ai.system": provider}
        if meta.get("flowgate_endpoint"):
            attrs["server.address"] = str(meta["flowgate_endpoint"])
        if model:
            attrs["gen_ai.request.model"] = str(model)
        for source, key in (("ls_temperature", "gen_ai.request.temperature"),
                            ("ls_max_tokens", "gen_ai.request.max_tokens")):
            if isinstance(meta.get(source), int | float):
                attrs[key] = meta[source]
        # named by the operation alone: the model can come from a caller's tweak, and span
        # names become labels in Tempo's span metrics (the model is an attribute)
        span = self._t.client(owner or self.run, operation, attrs)
        key = _llm_key(run_id)
        self._open[key] = span
        self._llm_started[key] = time.perf_counter()

    def on_llm_new_token(self, token, *, run_id, parent_run_id=None, **kw):
        key = _llm_key(run_id)
        started = self._llm_started.pop(key, None)
        if started is not None and key in self._open:
            self._open[key].add_event("gen_ai.first_token", {
                "gen_ai.response.time_to_first_token": round(time.perf_counter() - started, 6)})

    def on_llm_end(self, response, *, run_id, parent_run_id=None, **kw):
        key = _llm_key(run_id)
        self._llm_started.pop(key, None)
        span = self._open.pop(key, None)
        if span is not None:
            ended_with(span, **_llm_result(response))
        self._leave(run_id)

    def on_llm_error(self, error, *, run_id, parent_run_id=None, **kw):
        key = _llm_key(run_id)
        self._llm_started.pop(key, None)
        span = self._open.pop(key, None)
        if span is not None:
            ended_with(span, error=type(error).__name__)
        self._leave(run_id, error)

    def on_tool_start(self, serialized, input_str, *, run_id, parent_run_id=None, **kw):
        owner = self._enter(run_id, parent_run_id, kw.get("name"))
        if owner is None:
            return
        tool = (serialized or {}).get("name") or "tool"
        attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool}
        if kw.get("tool_call_id"):
            attrs["gen_ai.tool.call.id"] = str(kw["tool_call_id"])
        span = self._t.child(owner, "execute_tool", attributes=attrs)  # tools: attributes
        self._open[_tool_key(run_id)] = self._owner[run_id] = span  # what the tool runs

    def on_tool_end(self, output, *, run_id, parent_run_id=None, **kw):
        span = self._open.pop(_tool_key(run_id), None)
        if span is not None:
            status = getattr(output, "status", "success")
            ended_with(span, error="tool_error" if status == "error" else None)
        self._owner.pop(run_id, None)

    def on_tool_error(self, error, *, run_id, parent_run_id=None, **kw):
        span = self._open.pop(_tool_key(run_id), None)
        if span is not None:
            ended_with(span, error=type(error).__name__)
        self._owner.pop(run_id, None)

    def on_chain_end(self, outputs, *, run_id, parent_run_id=None, **kw):
        self._leave(run_id)

    def on_retriever_end(self, documents, *, run_id, parent_run_id=None, **kw):
        self._leave(run_id)

    def on_chain_error(self, error, *, run_id, parent_run_id=None, **kw):
        self._leave(run_id, error)

    def on_retriever_error(self, error, *, run_id, parent_run_id=None, **kw):
        self._leave(run_id, error)


def _llm_key(run_id: UUID) -> tuple[str, UUID]:
    """The LLM call's span, apart from the node span when the model is the node itself."""
    return ("llm", run_id)


def _tool_key(run_id: UUID) -> tuple[str, UUID]:
    return ("tool", run_id)


def _llm_result(response: Any) -> dict[str, Any]:
    """gen_ai.* attributes of a finished call: tokens, the model that answered, why it
    stopped."""
    try:
        generation = response.generations[0][0]
    except (IndexError, AttributeError, TypeError):
        return {}
    message = getattr(generation, "message", None)
    usage = getattr(message, "usage_metadata", None) or {}
    meta = {**(getattr(message, "response_metadata", None) or {}),
            **(getattr(generation, "generation_info", None) or {})}
    attrs: dict[str, Any] = {}
    for source, key in (("input_tokens", "gen_ai.usage.input_tokens"),
                        ("output_tokens", "gen_ai.usage.output_tokens")):
        if isinstance(usage.get(source), int):
            attrs[key] = usage[source]
    if meta.get("model_name"):
        attrs["gen_ai.response.model"] = str(meta["model_name"])
    if meta.get("finish_reason"):
        attrs["gen_ai.response.finish_reasons"] = [str(meta["finish_reason"])]
    return attrs
