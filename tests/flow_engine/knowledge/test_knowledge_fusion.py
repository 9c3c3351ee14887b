"""Hybrid search is reciprocal rank fusion of the vector and the keyword rankings: the pure
function, and the API where the two rankings disagree. And ingestion embeds in batches of
FLOW_ENGINE_KNOWLEDGE_EMBED_BATCH (counted in llm-sim's request log)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import requests
from kb_harness import create_base, search, upload_text, wait_document

from flow_engine.knowledge.fusion import RRF_K, fuse


def test_fuse_sums_reciprocal_ranks_and_ignores_raw_scores() -> None:
    vector = [(1, 0.99), (2, 0.98), (3, 0.10)]
    keyword = [(3, 42.0), (4, 7.0), (2, 0.001)]
    fused = fuse([vector, keyword], k=10)
    expected = {1: 1 / (RRF_K + 1), 2: 1 / (RRF_K + 2) + 1 / (RRF_K + 3),
                3: 1 / (RRF_K + 3) + 1 / (RRF_K + 1), 4: 1 / (RRF_K + 2)}
    assert [cid for cid, _ in fused] == [3, 2, 1, 4]  # found by both beats first in one
    for cid, score in fused:
        assert score == pytest.approx(expected[cid], abs=1e-6)


def test_fuse_keeps_k_breaks_ties_by_chunk_id_and_takes_one_sided_or_empty_rankings() -> None:
    tie = fuse([[(9, 1.0), (5, 0.5)], [(5, 3.0), (9, 1.0)]], k=1)
    assert tie == [(5, round(1 / (RRF_K + 1) + 1 / (RRF_K + 2), 6))]
    assert fuse([[(7, 0.3), (8, 0.2)], []], k=5) == [(7, round(1 / 61, 6)), (8, round(1 / 62, 6))]
    assert fuse([[], []], k=5) == []


# Vector search (llm-sim: hashed words and character trigrams) ranks "laptops.md" first for
# the query: "repairs", "repairing", "broke", "laptop" share trigrams with its words. Keyword
# search matches whole words only, and only "warranty.md" holds one of the query's words.
DISAGREE = {
    "warranty.md": "Warranty claims need the original receipt and the serial number.",
    "laptops.md": "Repairs to broke laptop screens and repairing laptop keyboards.",
    "holidays.md": "Employees get twenty eight days of paid holiday every year.",
}
QUERY = "warranty repair for broken laptops"


def test_hybrid_is_the_rank_fusion_of_the_vector_and_keyword_rankings(api) -> None:
    create_base(api)
    for name, text in DISAGREE.items():
        upload_text(api, "handbook", name, text)
    for name in DISAGREE:
        assert wait_document(api, "handbook", name)["status"] == "ready"
    vector = search(api, "handbook", QUERY, k=20, mode="vector")
    keyword = search(api, "handbook", QUERY, k=20, mode="keyword")
    assert vector[0]["document"] == "laptops.md", vector
    assert [h["document"] for h in keyword] == ["warranty.md"], keyword
    hybrid = search(api, "handbook", QUERY, k=3, mode="hybrid")
    expected: dict[str, float] = {}
    for ranking in (vector, keyword):
        for rank, hit in enumerate(ranking, start=1):
            expected[hit["document"]] = expected.get(hit["document"], 0.0) + 1 / (RRF_K + rank)
    order = sorted(expected, key=lambda doc: -expected[doc])
    assert hybrid[0]["document"] == "warranty.md" != vector[0]["document"]  # found by both
    assert [h["document"] for h in hybrid] == order[:3]
    assert [h["score"] for h in hybrid] == pytest.approx([expected[d] for d in order[:3]], abs=1e-6)


def test_ingestion_embeds_in_batches_of_the_configured_size(make_kapp, fresh_llm_sim: Any) -> None:
    api = make_kapp(knowledge_embed_batch=4).test_client()
    create_base(api, chunking={"size": 100, "overlap": 0})
    paragraphs = [f"Paragraph {i} explains refund rule number {i} for returned parcels."
                  for i in range(11)]
    doc = upload_text(api, "handbook", "rules.md", "\n\n".join(paragraphs))
    done = wait_document(api, "handbook", doc["id"])
    assert done["status"] == "ready" and done["chunks"] == 11
    seen = requests.get(f"{fresh_llm_sim.url}/sim/embedding-requests", timeout=10).json()
    assert [entry["inputs"] for entry in seen] == [4, 4, 3]
    assert len(seen) == math.ceil(done["chunks"] / 4)
