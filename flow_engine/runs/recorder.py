"""What a run did, from LangChain's callbacks: :class:`RunRecorder` turns them into run
events (``runs/runner.py`` lists them), sums the usage of every LLM call, keeps each call
for the per-model figures (:class:`LlmCall`) and stops a cancelled run by raising.

The compiled graph runs each node as a child run of its own, so runs are mapped to nodes by
their parent: the graph's root run is the flow, its direct children named like a node are
the nodes, and anything below a node belongs to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from flow_engine.components.subflows import add_usage, artifact_usage
from flow_engine.errors import RunCancelled
from flow_engine.flows.values import to_jsonable, to_text

if TYPE_CHECKING:
    from flow_engine.runs.runner import CancelToken

Emit = Callable[[str, dict[str, Any]], None]
MAX_TOOL_EVENT_CHARS = 4000  # of a tool's answer in its tool_result event


@dataclass(frozen=True, slots=True)
class LlmCall:
    """One LLM call of a run, for the engine's per-model figures (metrics.py)."""

    provider: str  # the endpoint (host[:port]) for OpenAI-compatible models
    model: str
    seconds: float
    outcome: str  # ok | error | rate_limited | timeout
    input_tokens: int = 0
    output_tokens: int = 0


class RunRecorder(BaseCallbackHandler):
    """Turns LangChain callbacks into run events; raises to stop a cancelled run."""

    raise_error = True  # so that RunCancelled raised here unwinds the run
    run_inline = True

    def __init__(self, emit: Emit, node_types: dict[str, str], cancel: CancelToken) -> None:
        self._emit = emit
        self._types = node_types
        self._cancel = cancel
        self._root: UUID | None = None
        self._node_of: dict[UUID, str] = {}  # every run inside a node → that node
        self._started: dict[UUID, float] = {}  # node runs → perf_counter at start
        self._token_index: dict[str, int] = {}
        self._tools: dict[UUID, str] = {}  # tool runs in progress → the tool's name
        self.durations: dict[str, float] = {}
        self.failed_node: str | None = None
        self.usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "llm_calls": 0}
        self._streamed: dict[UUID, int] = {}  # tokens of LLM calls that have not ended
        self._calling: dict[UUID, tuple[float, str, str]] = {}  # LLM calls: start, provider, model
        self.llm_calls: list[LlmCall] = []

    def _check_cancel(self) -> None:
        if self._cancel.cancelled:
            raise RunCancelled(f"run cancelled: {self._cancel.reason}")

    def _start(self, run_id: UUID, parent_run_id: UUID | None, name: str | None) -> None:
        self._check_cancel()
        if parent_run_id is None:
            self._root = run_id
        elif parent_run_id == self._root and name in self._types:
            self._node_of[run_id] = name
            self._started[run_id] = time.perf_counter()
            self._emit("node_started", {"node": name, "node_type": self._types[name]})
        elif parent_run_id in self._node_of:
            self._node_of[run_id] = self._node_of[parent_run_id]

    def _end(self, run_id: UUID, output: Any) -> None:
        started = self._started.pop(run_id, None)
        if started is None:
            return
        node = self._node_of[run_id]
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        self.durations[node] = duration_ms
        self._emit(
            "node_finished",
            {"node": node, "node_type": self._types[node], "output": to_jsonable(output),
             "duration_ms": duration_ms},
        )

    def _error(self, run_id: UUID) -> None:
        if run_id in self._started and self.failed_node is None:
            self.failed_node = self._node_of.get(run_id)

    # starts
    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, kw.get("name"))

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, kw.get("name"))
        self._call_started(run_id, kw)

    def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, kw.get("name"))
        self._call_started(run_id, kw)

    def _call_started(self, run_id: UUID, kw: dict[str, Any]) -> None:
        meta = kw.get("metadata") or {}
        params = kw.get("invocation_params") or {}
        model = meta.get("ls_model_name") or params.get("model") or params.get("model_name")
        provider = meta.get("flowgate_endpoint") or meta.get("ls_provider") or "unknown"
        self._calling[run_id] = (time.perf_counter(), str(provider), str(model or "unknown"))

    def _call_ended(self, run_id: UUID, outcome: str, usage: dict[str, Any] | None = None,
                    streamed: int = 0) -> None:
        started = self._calling.pop(run_id, None)
        if started is None:
            return
        usage = usage or {}
        self.llm_calls.append(LlmCall(
            started[1], started[2], time.perf_counter() - started[0], outcome,
            max(0, int(usage.get("input_tokens") or 0)),
            max(0, int(usage.get("output_tokens") or 0)) or streamed))

    def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, kw.get("name"))

    # progress
    def on_llm_new_token(self, token, *, run_id, parent_run_id=None, **kw):
        self._check_cancel()
        if not token:
            return
        self._streamed[run_id] = self._streamed.get(run_id, 0) + 1
        node = self._node_of.get(run_id)
        if node is None:
            return
        index = self._token_index.get(node, 0)
        self._token_index[node] = index + 1
        self._emit("token", {"node": node, "index": index, "text": token})

    # ends
    def on_chain_end(self, outputs, *, run_id, parent_run_id=None, **kw):
        self._end(run_id, outputs)

    def on_retriever_end(self, documents, *, run_id, parent_run_id=None, **kw):
        self._end(run_id, documents)

    def on_llm_end(self, response, *, run_id, parent_run_id=None, **kw):
        message = None
        try:
            generation = response.generations[0][0]
            message = getattr(generation, "message", None)
        except (IndexError, AttributeError):
            generation = None
        usage = getattr(message, "usage_metadata", None) or {}
        streamed = self._streamed.pop(run_id, 0)
        self.usage["llm_calls"] += 1
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            self.usage[key] += max(0, int(usage.get(key) or 0))  # a provider's, not trusted
        if not usage:  # no usage reported: what was streamed is the least it cost
            self.usage["output_tokens"] += streamed
            self.usage["total_tokens"] += streamed
        self._call_ended(run_id, "ok", usage, streamed)
        self._end(run_id, message if message is not None else getattr(generation, "text", None))

    def spent(self) -> dict[str, int]:
        """Usage so far, counting the tokens streamed by LLM calls that never ended (a
        failed or cancelled run still cost them; their input is unknown, so not counted)."""
        pending = sum(self._streamed.values())
        return {**self.usage, "output_tokens": self.usage["output_tokens"] + pending,
                "total_tokens": self.usage["total_tokens"] + pending}

    # tools (an Agent's calls: child runs of its node)
    def on_tool_start(self, serialized, input_str, *, run_id, parent_run_id=None, inputs=None,
                      **kw):
        self._start(run_id, parent_run_id, kw.get("name"))
        node = self._node_of.get(run_id)
        if node is None:
            return
        tool = self._tools[run_id] = (serialized or {}).get("name") or "tool"
        self._emit("tool_call", {"node": node, "tool": tool, "call_id": kw.get("tool_call_id"),
                                "args": to_jsonable(inputs if inputs is not None else input_str)})

    def on_tool_end(self, output, *, run_id, parent_run_id=None, **kw):
        add_usage(self.usage, artifact_usage(output))  # a FlowTool's flow: its LLM calls
        node, tool = self._node_of.get(run_id), self._tools.pop(run_id, None)
        if node is None:
            return
        self._emit("tool_result", {
            "node": node, "tool": tool, "call_id": getattr(output, "tool_call_id", None),
            "status": getattr(output, "status", "success"),
            "output": to_text(getattr(output, "content", output))[:MAX_TOOL_EVENT_CHARS]})

    def on_tool_error(self, error, *, run_id, parent_run_id=None, **kw):
        self._tools.pop(run_id, None)

    def on_chain_error(self, error, *, run_id, parent_run_id=None, **kw):
        self._error(run_id)

    def on_llm_error(self, error, *, run_id, parent_run_id=None, **kw):
        self._error(run_id)
        outcome = ("rate_limited" if getattr(error, "status_code", None) == 429
                   else "timeout" if isinstance(error, TimeoutError)
                   else "cancelled" if isinstance(error, RunCancelled) else "error")
        self._call_ended(run_id, outcome, streamed=self._streamed.get(run_id, 0))

    def on_retriever_error(self, error, *, run_id, parent_run_id=None, **kw):
        self._error(run_id)
