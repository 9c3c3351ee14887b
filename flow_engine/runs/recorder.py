"""What a run did, from LangChain's callbacks: :class:`RunRecorder` turns them into run
events (``runs/runner.py`` lists them), counts every LLM call in the run's ledger (usage, and
each call for the per-model figures: ``components/llm_calls.py``) and stops a cancelled run
by raising.

The compiled graph runs each node as a child run of its own, so runs are mapped to nodes by
their parent: the graph's root run is the flow, its direct children named like a node are
the nodes, and anything below a node belongs to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from flow_engine.components.llm_calls import Ledger
from flow_engine.errors import RunCancelled
from flow_engine.flows.values import to_jsonable, to_text

if TYPE_CHECKING:
    from flow_engine.runs.runner import CancelToken

Emit = Callable[[str, dict[str, Any]], None]
MAX_TOOL_EVENT_CHARS = 4000  # of a tool's answer in its tool_result event


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
        # the run's LLM usage and calls; also fed by the flows it calls (the run's context
        # carries it: components/llm_calls.py)
        self.ledger = Ledger()
        self.usage = self.ledger.usage
        self.llm_calls = self.ledger.calls

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
        self.ledger.started(run_id, kw)

    def on_llm_start(self, serialized, prompts, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, kw.get("name"))
        self.ledger.started(run_id, kw)

    def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kw):
        self._start(run_id, parent_run_id, kw.get("name"))

    # progress
    def on_llm_new_token(self, token, *, run_id, parent_run_id=None, **kw):
        self._check_cancel()
        if not token:
            return
        self.ledger.token(run_id)
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
        self._end(run_id, self.ledger.ended(run_id, response))

    def spent(self) -> dict[str, int]:
        """Usage so far, with the tokens of LLM calls that never ended (Ledger.spent)."""
        return self.ledger.spent()

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
        # (a FlowTool's flow counted its LLM calls into the ledger itself, as they ended)
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
        self.ledger.failed(run_id, error)

    def on_retriever_error(self, error, *, run_id, parent_run_id=None, **kw):
        self._error(run_id)
