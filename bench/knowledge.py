"""Knowledge bases: ingestion throughput, search latency at 10k / 100k chunks on SQLite (exact)
and PostgreSQL + pgvector (HNSW), HNSW recall@10 against exact search, and the latency of a
plain flow run with and without ingestion going on.

- ingest: documents uploaded to a KnowledgeService on SQLite, embedded by a real llm-sim
  over HTTP (batches of 64), until every chunk is searchable → chunks/s (target ≥ 500).
- search: chunks loaded through the store's own swap transaction, vectors from llm-sim's
  embedding function (the same hashed bag of words, in-process, so loading 100k is quick);
  the retrieval step only (query vectors precomputed) and, at 100k, end to end (the query
  embedded over HTTP). PostgreSQL is an embedded 18 with pgvector (tests/support).
  Targets: p50 ≤ 20 ms at 100k on PostgreSQL; recall@10 ≥ 0.95.
- runs: a ChatInput → PromptTemplate → ChatModel(echo) → ChatOutput flow, p50 of its runs
  in the engine's process alone, then while documents are being indexed (ratio).

    .venv/bin/python bench/knowledge.py [--sizes 10000,100000] [--queries 200]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # support.embedded_pg
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # before tests/: its flow_engine/ folder is not the package

from _support import free_port, pct, server  # noqa: E402

from flow_engine.knowledge.model import Chunking, ChunkRow, EmbeddingSpec, NewBase, SearchRequest  # noqa: E402
from flow_engine.knowledge.service import KnowledgeService  # noqa: E402
from flow_engine.knowledge.settings import KnowledgeSettings  # noqa: E402
from flow_engine.store import SqlFlowStore  # noqa: E402
from flowgate.llm_sim import embed  # noqa: E402

DIMS = 128
_WORD_TEXT = ("refund return parcel shipping invoice warranty battery order cancel support desk "
              "holiday expense travel receipt laptop badge password security email ticket card "
              "voucher delivery tracking customs payment discount price product repair replace "
              "defect manual account login address country week month day hour answer question "
              "team manager policy office remote contract salary bonus training course")
WORDS = _WORD_TEXT.split()


def text(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def service_on(url: str, sim_url: str) -> KnowledgeService:
    store = SqlFlowStore(url)
    return KnowledgeService(store.engine, KnowledgeSettings(knowledge_ingest_concurrency=2),
                            openai_base_url=sim_url, poll_s=0.05).start()


def ingest(sim_url: str, docs: int, chunks_per_doc: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        svc = service_on(f"sqlite:///{tmp}/ingest.db", sim_url)
        svc.store.create_base(NewBase("bench", "bench", EmbeddingSpec("openai", "sim", DIMS),
                                      Chunking(500, 0)), "bench")
        rng = random.Random(1)
        bodies = ["\n\n".join(text(rng, 70) for _ in range(chunks_per_doc)) for _ in range(docs)]
        started = time.perf_counter()
        for i, body in enumerate(bodies):
            svc.upload("bench", f"doc{i}.md", kind="markdown", data=body.encode(), metadata={},
                       actor="bench")
        while svc.store.busy() != (0, 0):
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        total = svc.store.counts(["bench"])["bench"]["chunks"]
        svc.close()
        return total / elapsed


def load(svc: KnowledgeService, n: int, seed: int) -> np.ndarray:
    """n chunks in documents of 1000, through the store's swap transaction; the vectors."""
    store = svc.store
    store.create_base(NewBase("kb", "kb", EmbeddingSpec("openai", "sim", DIMS), Chunking()), "bench")
    rng = random.Random(seed)
    vectors = []
    for d in range(0, n, 1000):
        rows = []
        for i in range(min(1000, n - d)):
            body = text(rng)
            vec = np.asarray(embed(body, DIMS), dtype=np.float32)
            vectors.append(vec)
            rows.append(ChunkRow(i, body, {"doc": d // 1000}, vec))
        store.put_upload("kb", f"d{d}", kind="text", content_type="text/plain", data=b"x",
                               sha256="0" * 64, metadata={}, actor="bench")
        [(kb, doc_id, version)] = store.claim("bench", 1)
        store.finish_ready(kb, doc_id, version, "bench", rows, DIMS)
    return np.vstack(vectors)


def search_latency(svc: KnowledgeService, queries: list[np.ndarray], k: int = 10):
    store, index = svc.store, svc.store.index
    kb = store.get_base("kb")
    results, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        with store.read() as conn:
            current = store.get_base("kb", conn)
            hits = index.vector(conn, "kb", current.generation, DIMS, q, k, {})
        times.append((time.perf_counter() - t0) * 1000)
        results.append([cid for cid, _ in hits])
    assert kb.dimensions == DIMS
    return results, pct(times, 50), pct(times, 99)


def exact_ids(vectors: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int = 10) -> list[int]:
    scores = vectors @ q
    top = np.argsort(-scores, kind="stable")[:k]
    return [int(ids[i]) for i in top]


def chunk_ids(svc: KnowledgeService) -> np.ndarray:
    import sqlalchemy as sa

    from flow_engine.knowledge import schema

    with svc.store.read() as conn:
        return np.array([r[0] for r in conn.execute(sa.select(schema.chunks.c.id).where(
            schema.chunks.c.kb_id == "kb").order_by(schema.chunks.c.id))], dtype=np.int64)


def run_latency(sim_url: str, runs: int) -> tuple[float, float | None]:
    """p50 of plain runs idle, and while documents are indexed (None: indexing ended before
    the runs did, so the second figure would not be measured under ingestion)."""
    from flow_engine.components import default_registry
    from flow_engine.flows.compile import compile_flow
    from flow_engine.flows.model import FlowVersion
    from flow_engine.flows.validate import validate_flow
    from flow_engine.runs.runner import RunInput, run

    flow = {"id": "plain", "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "p", "type": "PromptTemplate", "params": {"template": "Q: {q}"}},
        {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
                  {"source": "llm", "target": "out"}]}
    compiled = compile_flow(FlowVersion("plain", 1, validate_flow(flow, default_registry())),
                            default_registry())

    def p50() -> float:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            run(compiled, RunInput(input_value="how long do refunds take?"))
            times.append((time.perf_counter() - t0) * 1000)
        return pct(times, 50)

    idle = p50()
    with tempfile.TemporaryDirectory() as tmp:
        svc = service_on(f"sqlite:///{tmp}/busy.db", sim_url)
        svc.store.create_base(NewBase("busy", "busy", EmbeddingSpec("openai", "sim", DIMS),
                                      Chunking(500, 0)), "bench")
        rng = random.Random(2)
        for i in range(60):
            svc.upload("busy", f"doc{i}.md", kind="markdown", data="\n\n".join(
                text(rng, 70) for _ in range(60)).encode(), metadata={}, actor="bench")
        busy = p50()
        still_indexing = svc.store.busy() != (0, 0)
        svc.close()
    return idle, busy if still_indexing else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    from support.embedded_pg import EmbeddedPostgres

    port = free_port()
    with server([sys.executable, "-m", "flowgate.llm_sim", "--port", str(port)], port,
                "/v1/models"), EmbeddedPostgres() as pg:
        sim_url = f"http://127.0.0.1:{port}/v1"
        rate = ingest(sim_url, docs=40, chunks_per_doc=50)
        print(f"ingest (SQLite, llm-sim embeddings, batches of 64)   {rate:8.0f} chunks/s   (target ≥ 500)")
        idle, busy = run_latency(sim_url, runs=300)
        if busy is None:
            print(f"plain flow run p50: idle {idle:.3f} ms (indexing ended before the busy runs)")
        else:
            print(f"plain flow run p50: idle {idle:.3f} ms, during ingestion {busy:.3f} ms "
                  f"(ratio {busy / idle:.2f})")
        rng = random.Random(7)
        queries = [np.asarray(embed(text(rng, 8), DIMS), dtype=np.float32) for _ in range(args.queries)]
        figures: dict[str, float] = {}
        for size in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                lite = service_on(f"sqlite:///{tmp}/s.db", sim_url)
                vectors = load(lite, size, seed=size)
                search_latency(lite, queries[:3])  # the matrix is loaded once per generation
                _, s50, s99 = search_latency(lite, queries)
                ids = chunk_ids(lite)
                e2e = []
                if size == sizes[-1]:
                    for _ in range(50):
                        t0 = time.perf_counter()
                        lite.search("kb", SearchRequest("refund parcel warranty", 10, "vector"))
                        e2e.append((time.perf_counter() - t0) * 1000)
                lite.close()
            schema_name = f"bench_{size}"
            pg.execute(f"DROP SCHEMA IF EXISTS {schema_name} CASCADE; CREATE SCHEMA {schema_name}")
            pgs = service_on(f"{pg.url}?options=-csearch_path%3D{schema_name},public", sim_url)
            t0 = time.perf_counter()
            load(pgs, size, seed=size)
            load_s = time.perf_counter() - t0
            search_latency(pgs, queries[:5])
            pg_ids = chunk_ids(pgs)
            exact = [set(exact_ids(vectors, pg_ids, q)) for q in queries]
            default_ef = pgs.store.index.ef_search
            for ef in (default_ef, 2 * default_ef, 4 * default_ef):  # recall vs. speed
                pgs.store.index.ef_search = ef
                search_latency(pgs, queries[:3])
                got, ef50, ef99 = search_latency(pgs, queries)
                ef_recall = sum(len(set(r) & e) for r, e in zip(got, exact, strict=True)) / (
                    10 * len(queries))
                print(f"       PostgreSQL HNSW hnsw.ef_search {ef:4d}: p50 {ef50:6.2f} ms "
                      f"p99 {ef99:6.2f} ms recall@10 {ef_recall:.3f}")
                if ef == default_ef:  # what the engine does (FLOW_ENGINE_KNOWLEDGE_HNSW_EF_SEARCH)
                    p50, p99, recall = ef50, ef99, ef_recall
            pgs.close()
            label = f"{size // 1000}k"
            print(f"{label:>5} chunks  SQLite exact p50 {s50:6.2f} ms p99 {s99:6.2f} ms | "
                  f"PostgreSQL HNSW p50 {p50:6.2f} ms p99 {p99:6.2f} ms (load {load_s:.0f} s) | "
                  f"recall@10 {recall:.3f}   (ratio pg/sqlite p50 {p50 / s50:.2f})")
            if e2e:
                print(f"       end to end (query embedded by llm-sim over HTTP, SQLite) p50 "
                      f"{pct(e2e, 50):.2f} ms")
            figures.update({f"search_p50_ms_{label}_sqlite": round(s50, 3),
                            f"search_p99_ms_{label}_sqlite": round(s99, 3),
                            f"search_p50_ms_{label}_pg": round(p50, 3),
                            f"search_p99_ms_{label}_pg": round(p99, 3),
                            f"recall_at_10_{label}": round(recall, 4)})
            assert len(ids) == size
    print(summary(rate, idle, busy, figures, largest=f"{sizes[-1] // 1000}k"))


def summary(rate: float, idle: float, busy: float | None, figures: dict[str, float],
            largest: str) -> str:
    """The last line: one JSON object. The ``_100k_`` headline figures come from a 100k run
    only (null when none ran: a smaller run's latency under that name would mislead), recall
    from the largest run; a figure that was not measured is null, never NaN (not JSON)."""
    def num(value: float | None, digits: int = 3) -> float | None:
        return None if value is None or not math.isfinite(value) else round(value, digits)

    measured = {key: num(value, 4) for key, value in figures.items()}
    return json.dumps({"ingest_chunks_per_s": num(rate, 1),
                       "search_p50_ms_100k_pg": measured.get("search_p50_ms_100k_pg"),
                       "search_p50_ms_100k_sqlite": measured.get("search_p50_ms_100k_sqlite"),
                       "recall_at_10": measured.get(f"recall_at_10_{largest}"),
                       "run_p50_ms_idle": num(idle), "run_p50_ms_during_ingest": num(busy),
                       **measured}, allow_nan=False)


if __name__ == "__main__":
    main()
