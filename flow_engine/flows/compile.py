"""Compile a validated flow version into one LangChain Runnable, once.

The result is a :class:`FlowGraph`, a ``Runnable[dict, dict]``: its input is the run
input (``{"input_value", "input_type", "session_id"}``) and its output maps each output
node that ran to its value. It runs the nodes in topological order and invokes each node's
own Runnable as a child run named with the node id, exactly as ``RunnableSequence``
invokes its steps, so LangChain callbacks, tracers and ``astream_events`` attribute every
event to a node. Sibling branches run one after the other (a run is one greenlet).

Compiled graphs are cached by ``(flow_id, version)`` plus a digest of the run's tweaks:
versions are immutable, so an entry never goes stale and hot updates only move routing.
The cache is bounded by entries and by estimated bytes: a compiled graph holds about
:data:`BYTES_PER_DEFINITION_BYTE` times its definition's JSON size (measured: a 1 MB
BM25 document list compiles to about 21 MB of index and documents), plus a fixed overhead.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
    get_callback_manager_for_config,
    patch_config,
    set_config_context,
)

from flow_engine.components.base import BuildContext, ComponentRegistry, Routed
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.values import COERCE

NODE_TAG = "flowgate:node"
BYTES_PER_DEFINITION_BYTE = 24
ENTRY_OVERHEAD_BYTES = 32 * 1024
_SKIPPED = object()
#: ``config["configurable"][STREAM_TOKENS] = True`` makes chat models stream their tokens.
STREAM_TOKENS = "flowgate_stream_tokens"


@dataclass(frozen=True, slots=True)
class _Step:
    node_id: str
    type: str
    runnable: Runnable
    is_input: bool
    is_model: bool
    as_mapping: bool
    # (input name, source node, source output port, coercion function, required)
    feeds: tuple[tuple[str, str, str, Callable[[Any], Any], bool], ...]


class FlowGraph(Runnable[dict, dict]):
    """The compiled form of one flow version (see the module docstring)."""

    def __init__(self, name: str, steps: list[_Step], output_ids: list[str]) -> None:
        self.name = name
        self.steps = tuple(steps)
        self.output_ids = tuple(output_ids)

    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        config = ensure_config(config)
        run_manager = get_callback_manager_for_config(config).on_chain_start(
            None, input, name=config.get("run_name") or self.name, run_id=config.pop("run_id", None)
        )
        values: dict[str, Any] = {}
        # Streamed runs ask chat models to stream so that tokens reach callbacks as they
        # are generated; plain runs let cheap models answer in one piece.
        model_kwargs = {"stream": True} if config.get("configurable", {}).get(STREAM_TOKENS) else {}
        try:
            for step in self.steps:
                if step.is_input:
                    arg: Any = input
                else:
                    args = self._gather(step, values)
                    if args is None:
                        continue  # fed only through a branch that was not taken
                    if step.as_mapping:
                        arg = args
                    else:
                        arg = next(iter(args.values())) if args else None
                child = patch_config(
                    config, callbacks=run_manager.get_child(NODE_TAG), run_name=step.node_id
                )
                with set_config_context(child) as context:
                    if step.is_model:
                        values[step.node_id] = context.run(
                            step.runnable.invoke, arg, child, **model_kwargs
                        )
                    else:
                        values[step.node_id] = context.run(step.runnable.invoke, arg, child)
        except BaseException as exc:
            run_manager.on_chain_error(exc)
            raise
        result = {nid: values[nid] for nid in self.output_ids if nid in values}
        run_manager.on_chain_end(result)
        return result

    @staticmethod
    def _gather(step: _Step, values: Mapping[str, Any]) -> dict[str, Any] | None:
        """The node's inputs, or None when a required one comes from a skipped branch
        (an optional input from a skipped branch is simply left out)."""
        args: dict[str, Any] = {}
        for name, source, port, coerce, required in step.feeds:
            value = values.get(source, _SKIPPED)
            if isinstance(value, Routed):
                value = value.value if value.port == port else _SKIPPED
            if value is _SKIPPED:
                if required:
                    return None
                continue
            args[name] = coerce(value)
        return args


@dataclass(frozen=True)
class CompiledFlow:
    """A version's Runnable plus what the runner needs to describe it."""

    flow_id: str
    version: int
    runnable: FlowGraph
    node_types: Mapping[str, str]
    output_ids: tuple[str, ...]
    # the run input_type values some input node reads (None: the flow has no input node)
    input_types: frozenset[str] | None = None
    size_estimate: int = ENTRY_OVERHEAD_BYTES  # bytes it holds, for the cache's budget


def compile_flow(
    version: FlowVersion, registry: ComponentRegistry, ctx: BuildContext | None = None
) -> CompiledFlow:
    """Build the Runnable of a validated flow version (no caching; see CompileCache)."""
    ctx = ctx or BuildContext()
    definition = version.definition
    incoming: dict[str, list] = {n.id: [] for n in definition.nodes}
    for edge in definition.edges:
        incoming[edge.target].append(edge)
    steps: list[_Step] = []
    outputs: list[str] = []
    accepted: set[str] = set()
    has_input = False
    for node in _topological(definition):
        component = registry.get(node.type)
        if component is None:  # validated definitions cannot get here
            raise ValueError(f"unknown node type {node.type!r}")
        params = component.with_defaults(node.params)
        ports = {p.name: p for p in component.inputs(params)}
        feeds = tuple(
            (e.target_input, e.source, e.source_output, COERCE[ports[e.target_input].coerce],
             ports[e.target_input].required)
            for e in incoming[node.id]
        )
        runnable = component.build(node.id, params, ctx)
        steps.append(
            _Step(
                node_id=node.id,
                type=node.type,
                runnable=runnable,
                is_input=component.reads_run_input,
                is_model=isinstance(runnable, BaseChatModel),
                as_mapping=component.takes_mapping or len(feeds) > 1,
                feeds=feeds,
            )
        )
        if component.kind == "output":
            outputs.append(node.id)
        if component.reads_run_input:
            has_input = True
            accepted.update(getattr(component, "accepts", ()))
    graph = FlowGraph(f"flow:{version.flow_id}@{version.version}", steps, outputs)
    source = len(json.dumps(definition.raw, separators=(",", ":"), default=str))
    return CompiledFlow(
        flow_id=version.flow_id,
        version=version.version,
        runnable=graph,
        node_types={n.id: n.type for n in definition.nodes},
        output_ids=tuple(outputs),
        input_types=frozenset(accepted) if has_input else None,
        size_estimate=ENTRY_OVERHEAD_BYTES + BYTES_PER_DEFINITION_BYTE * source,
    )


def _topological(definition) -> list:
    """Kahn's algorithm, ties broken by position in the definition (stable, readable)."""
    order = {n.id: i for i, n in enumerate(definition.nodes)}
    indegree = dict.fromkeys(order, 0)
    succ: dict[str, list[str]] = {n: [] for n in order}
    for edge in definition.edges:
        indegree[edge.target] += 1
        succ[edge.source].append(edge.target)
    ready = sorted((n for n, d in indegree.items() if d == 0), key=order.__getitem__)
    result = []
    while ready:
        node_id = ready.pop(0)
        result.append(definition.nodes[order[node_id]])
        for nxt in succ[node_id]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
                ready.sort(key=order.__getitem__)
    if len(result) != len(order):
        raise ValueError("flow has a cycle")  # validated definitions cannot get here
    return result


def tweaks_digest(tweaks: Mapping[str, Any] | None) -> str | None:
    if not tweaks:
        return None
    blob = json.dumps(tweaks, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class CompileCache:
    """LRU of compiled flows keyed by ``(flow_id, version, tweaks digest)``, bounded by
    entries and by the sum of their ``size_estimate`` (an entry larger than the whole
    budget is compiled and used but not kept). Thread-safe; ``on_hit``/``on_miss`` hooks
    feed metrics, ``on_size`` gets the estimated bytes held after each change."""

    def __init__(
        self,
        max_entries: int = 512,
        on_hit: Callable[[], None] | None = None,
        on_miss: Callable[[], None] | None = None,
        max_bytes: int = 256 * 1024 * 1024,
        on_size: Callable[[int], None] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple, CompiledFlow] = OrderedDict()
        self._lock = threading.Lock()
        self._on_hit, self._on_miss, self._on_size = on_hit, on_miss, on_size
        self.hits = self.misses = 0

    def get_or_compile(
        self, key: tuple, build: Callable[[], CompiledFlow]
    ) -> CompiledFlow:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if hit is not None:
            if self._on_hit:
                self._on_hit()
            return hit
        compiled = build()  # outside the lock: compiling may take milliseconds
        with self._lock:
            self.misses += 1
            if compiled.size_estimate > self.max_bytes:
                pass  # used for this run only
            elif key in self._entries:
                compiled = self._entries[key]  # another request compiled it meanwhile
                self._entries.move_to_end(key)
            else:
                self._entries[key] = compiled
                self.bytes += compiled.size_estimate
                while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                    _key, evicted = self._entries.popitem(last=False)
                    self.bytes -= evicted.size_estimate
            held = self.bytes
        if self._on_miss:
            self._on_miss()
        if self._on_size:
            self._on_size(held)
        return compiled

    def __len__(self) -> int:
        return len(self._entries)
