"""Engine core overhead: the compiled flow versus the same chain written by hand in LCEL.

Flow: ChatInput → BM25Retriever → PromptTemplate → ChatModel(echo) → ChatOutput.
(a) the hand-written LCEL chain, invoked directly;
(b) the engine: compile-cache lookup + run() with its event recorder (what a request pays).
Both use the same component objects and run interleaved in one process, so machine noise
hits both alike. Also reports the first (compiling) run and the cache-hit steady state.

    .venv/bin/python bench/engine_core.py [--runs N]

Last line: one JSON object (``ratio_engine_over_lcel`` is b/a; target ≤ 1.3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnablePassthrough

from flow_engine.components import EchoChatModel, default_registry
from flow_engine.components.retrievers import FlowBM25Retriever, as_documents
from flow_engine.flows.compile import CompileCache, compile_flow
from flow_engine.flows.model import FlowVersion
from flow_engine.flows.validate import validate_flow
from flow_engine.flows.values import to_text
from flow_engine.runs.runner import RunInput, run

DOCS = [
    "Refunds are issued within 5 business days of receiving the returned item.",
    "Shipping is free for orders over 50 EUR; otherwise it costs 4.90 EUR.",
    "Our support desk is open Monday to Friday, 9:00 to 17:00 CET.",
    "Gift cards never expire and can be used for any product.",
    "Orders can be cancelled free of charge until they are shipped.",
    "We ship to all EU countries, Switzerland and Norway.",
]
TEMPLATE = "Answer from the context.\nContext: {context}\nQuestion: {question}"
FLOW = {
    "id": "bench-rag", "name": "bench",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "ctx", "type": "BM25Retriever", "params": {"documents": DOCS, "k": 2}},
        {"id": "p", "type": "PromptTemplate", "params": {"template": TEMPLATE}},
        {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [
        {"source": "in", "target": "ctx", "target_input": "query"},
        {"source": "in", "target": "p", "target_input": "question"},
        {"source": "ctx", "target": "p", "target_input": "context"},
        {"source": "p", "target": "llm"},
        {"source": "llm", "target": "out"},
    ],
}
QUESTION = "how long until I get my refund?"


def hand_written_chain():
    retriever = FlowBM25Retriever(k=2, base_documents=as_documents(DOCS))
    return (
        {"context": retriever | to_text, "question": RunnablePassthrough()}
        | PromptTemplate.from_template(TEMPLATE)
        | EchoChatModel()
        | StrOutputParser()
    )


def per_run_us(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    registry = default_registry()
    version = FlowVersion("bench-rag", 1, validate_flow(FLOW, registry))
    cache = CompileCache()
    chain = hand_written_chain()

    t0 = time.perf_counter()
    first = run(cache.get_or_compile(version.key, lambda: compile_flow(version, registry)),
                RunInput(QUESTION))
    first_run_us = (time.perf_counter() - t0) * 1e6
    expected = chain.invoke(QUESTION)
    assert first.output == expected, (first.output, expected)

    def engine():
        compiled = cache.get_or_compile(version.key, lambda: compile_flow(version, registry))
        return run(compiled, RunInput(QUESTION))

    for _ in range(200):  # warm both
        chain.invoke(QUESTION)
        engine()
    lcel: list[float] = []
    eng: list[float] = []
    per_round = max(1, args.runs // args.rounds)
    for _ in range(args.rounds):  # interleave so drift on a shared machine hits both
        lcel += per_run_us(lambda: chain.invoke(QUESTION), per_round)
        eng += per_run_us(engine, per_round)
    a, b = statistics.median(lcel), statistics.median(eng)
    steady_first_half = statistics.median(eng[: len(eng) // 2])
    steady_second_half = statistics.median(eng[len(eng) // 2:])
    print(f"hand-written LCEL chain  p50 {a:8.1f} µs   p90 {statistics.quantiles(lcel, n=10)[-1]:8.1f} µs")
    print(f"engine compiled run      p50 {b:8.1f} µs   p90 {statistics.quantiles(eng, n=10)[-1]:8.1f} µs")
    print(f"first run (compile+run)      {first_run_us:8.1f} µs")
    print(f"ratio engine/LCEL (p50)      {b / a:8.3f}   (target ≤ 1.3)")
    print(f"cache hits {cache.hits}, misses {cache.misses}")
    print(json.dumps({
        "lcel_p50_us": round(a, 1),
        "engine_p50_us": round(b, 1),
        "ratio_engine_over_lcel": round(b / a, 3),
        "first_run_us": round(first_run_us, 1),
        "steady_p50_first_half_us": round(steady_first_half, 1),
        "steady_p50_second_half_us": round(steady_second_half, 1),
        "compile_cache_hits": cache.hits,
        "compile_cache_misses": cache.misses,
        "runs_each": len(eng),
    }))


if __name__ == "__main__":
    main()
