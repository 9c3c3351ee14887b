"""Running one flow from inside another (the ``FlowTool``), and what a run tells the nodes
it runs about itself (:class:`RunContext`).

A run's context travels in LangChain's config, ``config["configurable"][RUN_CONTEXT]``,
which the compiled graph hands to every node and every node hands to what it calls (the
runner puts it there; see the hook patch). It says whose run it is — tenant, identity,
session, trace — and which flows enclose it (``chain``), so that a flow calling flows can be
held to :data:`MAX_DEPTH` and can never call a flow already running above it.

A sub-flow is part of the run that called it, not a run of its own: it runs in the same
greenlet, with the same cancel token (cancelling the parent stops it at its next node or
token), the same tenant and session (its ChatHistory nodes read that conversation), and
takes no second tenant run slot — a tenant allowed one run at a time could otherwise never
finish a run that calls a flow. It has no run record or events of its own, and its turn is
not added to the chat history; the caller's ``tool_result`` event carries its answer. Each
of its LLM calls goes into the calling run's ledger as it ends (components/llm_calls.py):
the run's usage and per-model figures include it, also when the sub-flow fails afterwards.
The tool's artifact reports the sub-flow's usage too, for the agent's own figures.

A sub-flow is traced under the tool call that ran it: of the tool's callback handlers only
those that make spans (:class:`SpanHandler`, ``runs/spans.py``) are asked for a handler of
the sub-flow's own — its ``run <flow>`` span, a child of the ``execute_tool`` span, with its
nodes and LLM calls below. The tool's other handlers (the run's recorder) are not handed
down: they would count the sub-flow's usage a second time and stream its tokens to the
caller as the run's own.

:class:`EngineSubflows` is what the engine puts in ``BuildContext.extra[SUBFLOWS]``: it finds
the flow's live version and its compiled graph through the flow service (cached like any
run's) and invokes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler

from flow_engine.components.llm_calls import USAGE_KEYS, Ledger
from flow_engine.errors import RunCancelled

log = logging.getLogger(__name__)

RUN_CONTEXT = "flowgate_run_context"  # the key in config["configurable"]
SUBFLOWS = "subflows"  # the key in BuildContext.extra
MAX_DEPTH = 4  # flows in a chain: the top flow and three nested below it


class SubflowRefused(Exception):
    """The flow cannot be run from here (unknown, not live, a cycle, too deep)."""


@dataclass(frozen=True)
class RunContext:
    """Who a run is for and which flows enclose it (see the module docstring)."""

    flow_id: str | None = None
    tenant: str | None = None
    identity: str | None = None
    session_id: str | None = None
    trace_id: str | None = None
    chain: tuple[str, ...] = ()  # the flows of this run, outermost first (its own last)
    cancel: Any = field(default=None, compare=False)  # has .cancelled (runs.runner.CancelToken)
    # where the LLM calls of this run and of the flows it calls are counted as they end
    ledger: Ledger | None = field(default=None, compare=False)

    def child(self, flow_id: str) -> RunContext:
        return replace(self, flow_id=flow_id, chain=(*self.chain, flow_id))

    @property
    def cancelled(self) -> bool:
        return bool(self.cancel is not None and self.cancel.cancelled)


def run_context(config: Mapping[str, Any] | None) -> RunContext:
    """The context of the run ``config`` belongs to (an empty one outside the engine)."""
    found = ((config or {}).get("configurable") or {}).get(RUN_CONTEXT)
    return found if isinstance(found, RunContext) else RunContext()


@dataclass(frozen=True)
class SubflowResult:
    flow_id: str
    version: int
    output: str
    usage: dict[str, int]


class Subflows(Protocol):
    def run(self, flow_ref: str, input_value: str, parent: RunContext,
            callbacks: Any = None) -> SubflowResult: ...


class SubflowSpans(Protocol):
    """The spans of one sub-flow run: a callback handler, ended when the sub-flow is."""

    def end(self, status: str, error: str | None = None,
            usage: Mapping[str, int] | None = None) -> None: ...


class SpanHandler(Protocol):
    """A callback handler that makes spans and can make a sub-flow's under a tool call."""

    def trace_subflow(self, tool_run_id: UUID | None, *, flow_id: str, version: int,
                      node_types: Mapping[str, str]) -> SubflowSpans: ...


class _FlowService(Protocol):  # flow_engine.service.FlowService, as far as it is used here
    def resolve(self, id_or_name: str, *, pinned: int | None, sticky_value: str | None,
                caller: Any = None) -> tuple[Any, int]: ...

    def compiled(self, flow: Any, version: int, tweaks: Any = None) -> Any: ...


class EngineSubflows:
    """Runs a flow's live version inside the calling run (see the module docstring)."""

    def __init__(self, flows: _FlowService) -> None:
        self.flows = flows

    def run(self, flow_ref: str, input_value: str, parent: RunContext,
            callbacks: Any = None) -> SubflowResult:
        """``callbacks``: the tool call's child callback manager (its handlers, the tool's
        run id as their parent): where the sub-flow's spans hang."""
        from flow_engine.errors import Conflict, NotFound
        from flow_engine.flows.values import to_text

        if len(parent.chain) >= MAX_DEPTH:
            raise SubflowRefused(f"flows may nest {MAX_DEPTH} deep at most: "
                                 f"{' → '.join((*parent.chain, flow_ref))}")
        try:
            flow, _ = self.flows.resolve(flow_ref, pinned=None, sticky_value=None)
        except NotFound:
            raise SubflowRefused(f"there is no flow '{flow_ref}'") from None
        if flow.id in parent.chain:
            raise SubflowRefused("a flow may not call a flow that is already running above it: "
                                 f"{' → '.join((*parent.chain, flow.id))}")
        if flow.live_version is None:
            raise SubflowRefused(f"flow '{flow.id}' has no live version")
        try:
            compiled = self.flows.compiled(flow, flow.live_version)
        except Conflict as exc:
            raise SubflowRefused(str(exc)) from None
        context = parent.child(flow.id)
        watch = _SubflowWatch(parent)
        log.info("subflow", extra={"flow_id": flow.id, "version": flow.live_version,
                                   "parent_flow_id": parent.flow_id, "tenant": parent.tenant,
                                   "identity": parent.identity, "trace_id": parent.trace_id,
                                   "depth": len(context.chain)})
        spans = _subflow_spans(callbacks, flow.id, flow.live_version, compiled.node_types)
        try:
            values = compiled.runnable.invoke(
                {"input_value": input_value, "input_type": "chat",
                 "session_id": parent.session_id, "tenant": parent.tenant, "flow_id": flow.id},
                {"callbacks": [watch, *spans], "configurable": {RUN_CONTEXT: context},
                 "metadata": {"flowgate_trace_id": parent.trace_id,
                              "flowgate_parent_flow": parent.flow_id}})
        except RunCancelled as exc:
            _end_spans(spans, "cancelled", exc.code, watch.usage)
            raise
        except BaseException as exc:
            _end_spans(spans, "failed", type(exc).__name__, watch.usage)
            raise
        _end_spans(spans, "succeeded", None, watch.usage)
        ran = [nid for nid in compiled.output_ids if nid in values]
        chat = [nid for nid in ran if compiled.node_types[nid] == "ChatOutput"]
        first = (chat or ran or [None])[0]
        output = to_text(values[first]) if first is not None else ""
        return SubflowResult(flow.id, flow.live_version, output, watch.usage)


def _subflow_spans(callbacks: Any, flow_id: str, version: int,
                   node_types: Mapping[str, str]) -> list[Any]:
    """A span handler for the sub-flow from each of the tool call's span handlers (none
    when the run is not traced); tracing never fails a run."""
    handlers: Iterable[Any] = getattr(callbacks, "handlers", callbacks) or ()
    tool_run_id = getattr(callbacks, "parent_run_id", None)
    spans = []
    for handler in handlers:
        if callable(getattr(handler, "trace_subflow", None)):
            try:
                spans.append(handler.trace_subflow(tool_run_id, flow_id=flow_id,
                                                   version=version, node_types=node_types))
            except Exception:
                log.exception("the sub-flow's spans could not be started")
    return spans


def _end_spans(spans: Iterable[SubflowSpans], status: str, error: str | None,
               usage: Mapping[str, int]) -> None:
    for span in spans:
        try:
            span.end(status, error, usage)
        except Exception:
            log.exception("the sub-flow's spans could not be ended")


class _SubflowWatch(BaseCallbackHandler):
    """Stops the sub-flow when the calling run is cancelled; counts each of its LLM calls in
    the calling run's ledger and sums its usage for the tool's artifact."""

    raise_error = True
    run_inline = True

    def __init__(self, parent: RunContext) -> None:
        self.parent = parent
        self.usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "llm_calls": 0}

    def _check(self) -> None:
        if self.parent.cancelled:
            raise RunCancelled(f"run cancelled: {self.parent.cancel.reason}")

    def on_chain_start(self, *args: Any, **kwargs: Any) -> None:
        self._check()

    def on_chat_model_start(self, serialized: Any, messages: Any, *, run_id: UUID,
                            **kwargs: Any) -> None:
        self._check()
        if self.parent.ledger is not None:
            self.parent.ledger.started(run_id, kwargs)

    def on_llm_start(self, serialized: Any, prompts: Any, *, run_id: UUID,
                     **kwargs: Any) -> None:
        self._check()
        if self.parent.ledger is not None:
            self.parent.ledger.started(run_id, kwargs)

    def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
        self._check()

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        self._check()
        if token and self.parent.ledger is not None:
            self.parent.ledger.token(run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        if self.parent.ledger is not None:
            self.parent.ledger.failed(run_id, error)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self.parent.ledger is not None:
            self.parent.ledger.ended(run_id, response)
        try:
            message = response.generations[0][0].message
        except (IndexError, AttributeError):
            return
        add_usage(self.usage, getattr(message, "usage_metadata", None) or {}, calls=1)

    def on_tool_end(self, output: Any, **kwargs: Any) -> None:
        add_usage(self.usage, artifact_usage(output))  # a flow this sub-flow called


def add_usage(total: dict[str, int], usage: Mapping[str, Any], calls: int | None = None) -> None:
    """Add LLM ``usage`` (LangChain's usage_metadata, or a run's usage) into ``total``."""
    for key in USAGE_KEYS:
        total[key] += max(0, int(usage.get(key) or 0))  # a provider's, not trusted
    total["llm_calls"] += calls if calls is not None else int(usage.get("llm_calls") or 0)


def artifact_usage(output: Any) -> Mapping[str, Any]:
    """The LLM usage a tool reports in its ToolMessage's artifact (a FlowTool: its flow's)."""
    artifact = getattr(output, "artifact", None)
    usage = artifact.get("usage") if isinstance(artifact, dict) else None
    return usage if isinstance(usage, dict) else {}
