"""flow_engine.flows.compile: the compile cache (hits, misses, LRU, hooks, threads), node run
names seen by LangChain callbacks, and the tweaks digest that keys compiled variants."""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler

from flow_engine.components import default_registry
from flow_engine.flows.compile import CompileCache, CompiledFlow, compile_flow, tweaks_digest
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import validate_flow

REGISTRY = default_registry()


# ---------------------------------------------------------------------------------------
# Helpers


def node(node_id: str, type_: str, **params: Any) -> dict[str, Any]:
    return {"id": node_id, "type": type_, "params": params}


def edge(source: str, target: str, target_input: str | None = None) -> dict[str, Any]:
    out = {"source": source, "target": target}
    if target_input:
        out["target_input"] = target_input
    return out


# Nodes are listed out of order on purpose: compile must run them in topological order
# (ties broken by position in the definition), not in the order they are written.
RAG_FLOW = {
    "id": "rag",
    "nodes": [
        node("out", "ChatOutput"),
        node("parse", "StrOutputParser"),
        node("llm", "ChatModel", provider="echo"),
        node("p", "PromptTemplate", template="Context: {context}\nQ: {question}"),
        node("ctx", "BM25Retriever", documents=["tea is hot", "ice is cold"]),
        node("in", "ChatInput"),
    ],
    "edges": [
        edge("in", "ctx", "query"), edge("in", "p", "question"), edge("ctx", "p", "context"),
        edge("p", "llm"), edge("llm", "parse"), edge("parse", "out"),
    ],
}
RAG_ORDER = ["in", "ctx", "p", "llm", "parse", "out"]

# Two independent branches: ties are broken by definition position (b before a).
BRANCHES_FLOW = {
    "id": "branches",
    "nodes": [
        node("in", "ChatInput"),
        node("b", "PromptTemplate", template="B {x}"),
        node("a", "PromptTemplate", template="A {x}"),
        node("out_a", "TextOutput"),
        node("out_b", "ChatOutput"),
    ],
    "edges": [edge("in", "a"), edge("in", "b"), edge("a", "out_a"), edge("b", "out_b")],
}
BRANCHES_ORDER = ["in", "b", "a", "out_a", "out_b"]


def compiled(data: dict[str, Any], version: int = 1) -> CompiledFlow:
    return compile_flow(FlowVersion(data["id"], version, validate_flow(data, REGISTRY)), REGISTRY)


class NodeRunRecorder(BaseCallbackHandler):
    """Records the names of runs started directly under the graph's own (root) run."""

    def __init__(self) -> None:
        self.root: UUID | None = None
        self.root_name: str | None = None
        self.children: list[str] = []

    def _started(self, run_id: UUID, parent_run_id: UUID | None, name: str | None) -> None:
        if parent_run_id is None:
            self.root, self.root_name = run_id, name
        elif parent_run_id == self.root:
            self.children.append(name)

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, **kwargs):
        self._started(run_id, parent_run_id, kwargs.get("name"))

    def on_chat_model_start(self, serialized, messages, *, run_id, parent_run_id=None, **kwargs):
        self._started(run_id, parent_run_id, kwargs.get("name"))

    def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kwargs):
        self._started(run_id, parent_run_id, kwargs.get("name"))


class Entry:
    """A stand-in compiled flow: only its size matters to the cache."""

    def __init__(self, size_estimate: int = 1024) -> None:
        self.size_estimate = size_estimate


class Builds:
    """A ``build`` callable for CompileCache that makes a fresh object per call."""

    def __init__(self, delay: float = 0.0, size: int = 1024) -> None:
        self.calls = 0
        self.delay = delay
        self.size = size
        self._lock = threading.Lock()

    def __call__(self) -> Entry:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)  # widens the race window between threads
        return Entry(self.size)


# ---------------------------------------------------------------------------------------
# Node run names


@pytest.mark.parametrize(("data", "order"), [
    pytest.param(RAG_FLOW, RAG_ORDER, id="rag-chain"),
    pytest.param(BRANCHES_FLOW, BRANCHES_ORDER, id="independent-branches"),
])
def test_each_node_runs_as_a_child_run_named_with_its_id(
    data: dict[str, Any], order: list[str]
) -> None:
    flow = compiled(data)
    recorder = NodeRunRecorder()

    flow.runnable.invoke({"input_value": "tea", "input_type": "chat"},
                         {"callbacks": [recorder]})

    assert recorder.root_name == f"flow:{data['id']}@1"
    assert recorder.children == order
    assert set(recorder.children) == {n["id"] for n in data["nodes"]}


def test_compiled_graph_returns_the_outputs_that_ran() -> None:
    flow = compiled(RAG_FLOW)

    result = flow.runnable.invoke({"input_value": "hot tea", "input_type": "chat"})

    assert result == {"out": "[echo: not an LLM] Context: tea is hot\nQ: hot tea"}
    assert flow.output_ids == ("out",)
    assert flow.node_types["ctx"] == "BM25Retriever"
    assert (flow.flow_id, flow.version) == ("rag", 1)


def test_run_name_in_config_renames_only_the_graph_run() -> None:
    recorder = NodeRunRecorder()

    compiled(RAG_FLOW).runnable.invoke({"input_value": "tea"},
                                       {"callbacks": [recorder], "run_name": "custom"})

    assert recorder.root_name == "custom"
    assert recorder.children == RAG_ORDER


# ---------------------------------------------------------------------------------------
# CompileCache


def test_same_key_returns_the_identical_object_and_counts() -> None:
    cache = CompileCache()
    build = Builds()

    first = cache.get_or_compile(("f", 1, None), build)
    second = cache.get_or_compile(("f", 1, None), build)
    other = cache.get_or_compile(("f", 2, None), build)

    assert first is second
    assert other is not first
    assert build.calls == 2
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)


def test_cache_keeps_real_compiled_flows() -> None:
    cache = CompileCache()

    first = cache.get_or_compile(("rag", 1, None), lambda: compiled(RAG_FLOW))
    again = cache.get_or_compile(("rag", 1, None), lambda: compiled(RAG_FLOW))

    assert again is first
    assert again.runnable.invoke({"input_value": "tea"})["out"].startswith("[echo: not an LLM]")


def test_least_recently_used_entry_is_evicted() -> None:
    cache = CompileCache(max_entries=2)
    build = Builds()
    a = cache.get_or_compile("a", build)
    cache.get_or_compile("b", build)
    assert cache.get_or_compile("a", build) is a  # "a" is now the most recently used

    cache.get_or_compile("c", build)  # evicts "b"

    assert len(cache) == 2
    assert cache.get_or_compile("a", build) is a
    calls = build.calls
    cache.get_or_compile("b", build)
    assert build.calls == calls + 1  # "b" had to be compiled again
    assert (cache.hits, cache.misses) == (2, 4)


def test_the_cache_is_bounded_by_estimated_bytes_not_only_by_entries() -> None:
    cache = CompileCache(max_entries=100, max_bytes=10_000)
    build = Builds(size=4_000)
    for key in "abcd":
        cache.get_or_compile(key, build)

    assert len(cache) == 2 and cache.bytes == 8_000  # "a" and "b" evicted by size
    calls = build.calls
    cache.get_or_compile("d", build)
    assert build.calls == calls  # the most recent entries stayed


def test_an_entry_larger_than_the_budget_is_used_but_not_kept() -> None:
    cache = CompileCache(max_bytes=10_000)
    small = cache.get_or_compile("small", Builds(size=1_000))

    huge = cache.get_or_compile("huge", Builds(size=50_000))

    assert huge.size_estimate == 50_000
    assert len(cache) == 1 and cache.bytes == 1_000
    assert cache.get_or_compile("small", Builds()) is small


def test_size_estimate_grows_with_the_definition() -> None:
    docs = [f"document number {i} " * 20 for i in range(200)]
    flow = {**RAG_FLOW, "nodes": [
        {**n, "params": {**n.get("params", {}), "documents": docs}} if n["type"] == "BM25Retriever"
        else n for n in RAG_FLOW["nodes"]]}

    small, big = compiled(RAG_FLOW), compiled(flow)

    assert big.size_estimate > small.size_estimate + 20 * len(json.dumps(docs))


@pytest.mark.parametrize(("keys", "hits", "misses"), [
    pytest.param(["a"], 0, 1, id="one-miss"),
    pytest.param(["a", "a", "a"], 2, 1, id="then-hits"),
    pytest.param(["a", "b", "a", "b"], 2, 2, id="two-keys"),
])
def test_hooks_are_called_once_per_hit_and_miss(keys: list[str], hits: int, misses: int) -> None:
    calls: list[str] = []
    cache = CompileCache(on_hit=lambda: calls.append("hit"), on_miss=lambda: calls.append("miss"))

    for key in keys:
        cache.get_or_compile(key, Builds())

    assert calls.count("hit") == hits == cache.hits
    assert calls.count("miss") == misses == cache.misses


def test_concurrent_callers_of_one_key_all_get_the_same_object() -> None:
    cache = CompileCache()
    build = Builds(delay=0.02)
    start = threading.Barrier(8)
    results: list[object] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            start.wait()
            results.append(cache.get_or_compile(("f", 1, None), build))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert errors == []
    assert len(results) == 8
    assert len({id(r) for r in results}) == 1  # builds may race; only one result is kept
    assert cache.get_or_compile(("f", 1, None), build) is results[0]
    assert len(cache) == 1
    assert build.calls >= 1
    assert cache.hits + cache.misses == 9
    assert cache.misses == build.calls


# ---------------------------------------------------------------------------------------
# tweaks_digest


@pytest.mark.parametrize("tweaks", [
    pytest.param(None, id="none"),
    pytest.param({}, id="empty"),
])
def test_no_tweaks_have_no_digest(tweaks: Any) -> None:
    assert tweaks_digest(tweaks) is None


def test_digest_is_stable_under_key_order() -> None:
    one = {"llm": {"temperature": 0.5, "model": "m"}, "ctx": {"k": 2}}
    two = {"ctx": {"k": 2}, "llm": {"model": "m", "temperature": 0.5}}

    assert tweaks_digest(one) == tweaks_digest(two)
    assert tweaks_digest(one) == tweaks_digest({"ctx": {"k": 2}, "llm": {"temperature": 0.5,
                                                                       "model": "m"}})
    assert len(tweaks_digest(one)) == 32
    assert int(tweaks_digest(one), 16) >= 0  # hex


@pytest.mark.parametrize("other", [
    pytest.param({"llm": {"temperature": 0.6}}, id="value"),
    pytest.param({"llm": {"temperature": "0.5"}}, id="type"),
    pytest.param({"llm": {"top_p": 0.5}}, id="param"),
    pytest.param({"model": {"temperature": 0.5}}, id="node"),
    pytest.param({"llm": {"temperature": 0.5}, "ctx": {"k": 1}}, id="extra-node"),
])
def test_different_tweaks_have_different_digests(other: dict[str, Any]) -> None:
    assert tweaks_digest(other) != tweaks_digest({"llm": {"temperature": 0.5}})
