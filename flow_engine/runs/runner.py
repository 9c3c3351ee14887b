"""Run a compiled flow: ``run()`` returns a :class:`RunResult`; ``stream()`` yields
:class:`RunEvent` s while the flow runs.

Run events (DESIGN.md), in order, each with a per-run sequence number starting at 1:

- ``run_started``   ``{run_id, flow_id, version, session_id}`` — before any node runs
- ``node_started``  ``{node, node_type}``
- ``token``         ``{node, index, text}`` — one per LLM token, index counts per node from 0
- ``tool_call``     ``{node, tool, call_id, args}`` — an Agent runs a tool (LangChain's
  ``on_tool_start``), between the tokens of its model calls
- ``tool_result``   ``{node, tool, call_id, status, output}`` — what the tool answered
  (``status: error`` when it refused; the model sees the same text)
- ``node_finished`` ``{node, node_type, output, duration_ms}``
- ``error``         ``{code, message, node}`` — last event of a failed or cancelled run
- ``run_finished``  the full result, as the non-streamed call returns it — last event

Events come from LangChain callbacks (``runs/recorder.py``: the compiled graph runs each
node as a child run of its own, so the recorder maps runs to nodes by their parent; it also
keeps each LLM call for the per-model figures). Everything is synchronous
(a WSGI worker under gevent has no asyncio loop); ``stream()`` runs the flow in a thread,
which gevent turns into a greenlet. Cancellation is checked at every node start and every
token: the recorder raises, LangChain unwinds, and the provider's HTTP stream is closed.

Every node is given the run's context (``components/subflows.py``: tenant, identity,
session, trace, the flows enclosing it, the cancel token) in
``config["configurable"][RUN_CONTEXT]``; an Agent's FlowTool runs another flow with it.
Usage counts every LLM call of the run, those of flows its tools ran included.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from flow_engine.components.llm_calls import LlmCall
from flow_engine.components.openai_compat import ProviderError
from flow_engine.components.subflows import RUN_CONTEXT, RunContext
from flow_engine.errors import FlowgateError, LLMError, RunFailed, RunTimeout
from flow_engine.flows.compile import STREAM_TOKENS, CompiledFlow
from flow_engine.flows.values import to_text
from flow_engine.runs.recorder import Emit, RunRecorder

_MAX_ERROR_MESSAGE = 500
# stream_with hands these to the consumer at once; other events wait for the run to wait
_SEND_AT_ONCE = frozenset({"token", "run_finished", "error"})


@dataclass(frozen=True, slots=True)
class RunEvent:
    seq: int
    type: str
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "type": self.type, **self.data}


@dataclass(frozen=True)
class RunInput:
    """LangFlow's run body, minus what routing consumes (flow id, version, tweaks)."""

    input_value: str | None = None
    input_type: str = "chat"
    output_type: str = "chat"
    session_id: str | None = None
    tenant: str | None = None  # whose conversation a ChatHistory node reads
    identity: str | None = None  # the caller a proxy forwarded (carried into sub-flows)
    trace_id: str | None = None

    def graph_input(self) -> dict[str, Any]:
        return {
            "input_value": self.input_value,
            "input_type": self.input_type,
            "session_id": self.session_id,
            "tenant": self.tenant,
        }


@dataclass
class RunResult:
    run_id: str
    flow_id: str
    version: int
    session_id: str | None
    output: str | None
    outputs: list[dict[str, Any]]
    usage: dict[str, int]
    duration_ms: float
    nodes: dict[str, float] = field(default_factory=dict)
    llm_calls: list[LlmCall] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # in the answer only when there are some

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "flow_id": self.flow_id,
            "version": self.version,
            "session_id": self.session_id,
            "output": self.output,
            "outputs": self.outputs,
            "usage": self.usage,
            "duration_ms": self.duration_ms,
            **({"warnings": self.warnings} if self.warnings else {}),
        }


class CancelToken:
    """Set from anywhere (API call, client disconnect); the run stops at its next node
    start or token."""

    __slots__ = ("_event", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def execute(
    compiled: CompiledFlow,
    run_input: RunInput,
    *,
    emit: Emit,
    run_id: str | None = None,
    cancel: CancelToken | None = None,
    display_names: dict[str, str] | None = None,
    stream_tokens: bool = False,
    observer: BaseCallbackHandler | None = None,
) -> RunResult:
    """Run the flow in the calling thread, reporting every event to ``emit``. Raises a
    :class:`FlowgateError` (the run's ``error`` event has been emitted) on failure.
    ``stream_tokens`` asks every chat model to stream (always on for the openai provider);
    ``observer`` is one more callback handler (the run's spans: ``runs/spans.py``)."""
    run_id = run_id or uuid.uuid4().hex
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    emit("run_started", {"run_id": run_id, "flow_id": compiled.flow_id,
                         "version": compiled.version, "session_id": run_input.session_id})
    recorder = RunRecorder(emit, dict(compiled.node_types), cancel)
    context = RunContext(flow_id=compiled.flow_id, tenant=run_input.tenant,
                         identity=run_input.identity, session_id=run_input.session_id,
                         trace_id=run_input.trace_id, chain=(compiled.flow_id,), cancel=cancel,
                         ledger=recorder.ledger)
    try:
        values = compiled.runnable.invoke(
            {**run_input.graph_input(), "flow_id": compiled.flow_id},
            {"callbacks": [recorder] if observer is None else [recorder, observer],
             "metadata": {"flowgate_run_id": run_id},
             "configurable": {STREAM_TOKENS: stream_tokens, RUN_CONTEXT: context}},
        )
    except BaseException as exc:
        error = classify_error(exc, recorder.failed_node, compiled.node_types)
        error.details.setdefault("node", recorder.failed_node)  # kept on the run record too
        error.usage = recorder.spent()  # for the tenant's token count (never sent to clients)
        error.llm_calls = recorder.llm_calls  # for the per-model figures (neither)
        emit("error", {**error.to_dict(), "node": recorder.failed_node})
        if error is exc:
            raise
        raise error from exc
    result = RunResult(
        run_id=run_id,
        flow_id=compiled.flow_id,
        version=compiled.version,
        session_id=run_input.session_id,
        output=None,
        outputs=[],
        usage=recorder.usage,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        nodes=recorder.durations,
        llm_calls=recorder.llm_calls,
        warnings=_input_warnings(compiled, run_input),
    )
    _fill_outputs(result, values, compiled, run_input, display_names or {})
    emit("run_finished", result.as_dict())
    return result


def run(compiled: CompiledFlow, run_input: RunInput, **kwargs: Any) -> RunResult:
    """Run to completion and return the result (events are discarded)."""
    return execute(compiled, run_input, emit=_discard, **kwargs)


def stream(
    compiled: CompiledFlow,
    run_input: RunInput,
    *,
    run_id: str | None = None,
    cancel: CancelToken | None = None,
    sink: Emit | None = None,
) -> Iterator[RunEvent]:
    """Yield the run's events as they happen. Closing the iterator early cancels the run.
    ``sink`` additionally receives every event (e.g. to append it to an event log)."""
    cancel = cancel or CancelToken()

    def work(emit: Emit) -> None:
        def both(kind: str, data: dict[str, Any]) -> None:
            if sink is not None:
                sink(kind, data)
            emit(kind, data)

        execute(compiled, run_input, emit=both, run_id=run_id, cancel=cancel, stream_tokens=True)

    for event in stream_with(work, cancel=cancel):
        if event is not None:
            yield event


def stream_with(
    work: Callable[[Emit], Any],
    *,
    cancel: CancelToken,
    keepalive_s: float | None = None,
    on_event: Callable[[RunEvent], None] | None = None,
    cancel_on_close: bool = True,
) -> Iterator[RunEvent | None]:
    """Run ``work(emit)`` in a thread (a greenlet under gevent) and yield what it emits as
    numbered events (``on_event`` sees each one first, in the run's thread); ``None`` when
    ``keepalive_s`` passes without one. Closing the iterator early cancels the run unless
    ``cancel_on_close`` is false (the run then goes on and its events go to ``on_event``)."""
    events: queue.Queue = queue.Queue()
    done = object()
    counter = iter(range(1, 1 << 62))

    def emit(kind: str, data: dict[str, Any]) -> None:
        event = RunEvent(next(counter), kind, data)
        if on_event is not None:
            on_event(event)
        events.put(event)
        if kind in _SEND_AT_ONCE:
            # Let the consumer send it now. Under gevent a queue put does not switch, and a
            # run whose provider socket already holds the whole answer never blocks: without
            # this yield the first token would leave only when the run had finished. Node
            # events go out when the run next waits (on its LLM request, at the latest at
            # its end): yielding for each put four socket writes ahead of the LLM request.
            time.sleep(0)

    def worker() -> None:
        try:
            work(emit)
        except FlowgateError:
            pass  # already reported as an error event
        except BaseException as exc:
            emit("error", {"code": "internal", "message": _short(exc), "node": None})
        finally:
            events.put(done)

    thread = threading.Thread(target=worker, name="flowgate-run", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            try:
                item = events.get(timeout=keepalive_s)
            except queue.Empty:
                yield None
                continue
            if item is done:
                finished = True
                return
            yield item
    finally:
        if not finished and cancel_on_close:
            cancel.cancel("the stream's consumer went away")


def classify_error(
    exc: BaseException, node: str | None, node_types: dict[str, str] | Any
) -> FlowgateError:
    """Map an exception from inside a run to the error contract (scrubbed, no traceback)."""
    if isinstance(exc, FlowgateError):
        return exc
    where = f"node '{node}' ({node_types.get(node, '?')})" if node else "the flow"
    name = type(exc).__name__
    if isinstance(exc, ProviderError):
        provider = f"the LLM provider at {exc.origin}" if exc.origin else "the LLM provider"
        if isinstance(exc, TimeoutError):
            return RunTimeout(f"{where}: {provider} timed out")
        detail = f"HTTP {exc.status_code}" if exc.status_code else name
        return LLMError(f"{where}: {provider} failed ({detail}): {_short(exc)}")
    if isinstance(exc, TimeoutError):
        return RunTimeout(f"{where} timed out")
    return RunFailed(f"{where} failed: {name}: {_short(exc)}")


def _input_warnings(compiled: CompiledFlow, run_input: RunInput) -> list[str]:
    """The run's input_value went nowhere: no input node of the flow reads its input_type."""
    reads = compiled.input_types
    if not run_input.input_value or reads is None or run_input.input_type in reads:
        return []
    named = sorted(reads - {"any"}) or ["any"]
    return [f"input_type '{run_input.input_type}' is read by no input node of this flow: "
            f"input_value was not used; send input_type {' or '.join(map(repr, named))}"]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:_MAX_ERROR_MESSAGE]


def _discard(kind: str, data: dict[str, Any]) -> None:
    return None


_SENDER = {"ChatOutput": ("message", "Machine", "AI"), "TextOutput": ("text", None, None)}


def _fill_outputs(result, values, compiled, run_input: RunInput, display_names) -> None:
    """``output`` is the text of the first selected output node that ran; ``outputs`` keeps
    LangFlow's nesting (``outputs[0].outputs[i].results.message.text``)."""
    wanted = {"chat": ("ChatOutput",), "text": ("TextOutput",)}.get(run_input.output_type)
    ran = [nid for nid in compiled.output_ids if nid in values]
    selected = [n for n in ran if wanted is None or compiled.node_types[n] in wanted] or ran
    entries = []
    for node_id in selected:
        node_type = compiled.node_types[node_id]
        text = to_text(values[node_id])
        key, sender, sender_name = _SENDER.get(node_type, ("text", None, None))
        message = {"text": text, "sender": sender, "sender_name": sender_name,
                   "session_id": run_input.session_id}
        entries.append({
            "component_id": node_id,
            "component_display_name": display_names.get(node_id, node_type),
            "results": {key: message},
            "outputs": {key: {"message": text, "type": "text"}},
            "artifacts": {key: text, "type": "text"},
            "messages": [{"message": text, "sender": sender, "sender_name": sender_name,
                          "session_id": run_input.session_id, "component_id": node_id}],
        })
    result.outputs = [{"inputs": {"input_value": run_input.input_value}, "outputs": entries}]
    result.output = entries[0]["results"][_SENDER.get(
        compiled.node_types[selected[0]], ("text",))[0]]["text"] if entries else None
