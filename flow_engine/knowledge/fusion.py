"""Pure helpers of search: the words of a keyword query, and reciprocal rank fusion.

Keyword queries are never handed to a query language as written: the query's words
(letters and digits only, lower-cased, common English stopwords left out unless nothing
else remains, at most 32) are ORed — quoted for SQLite FTS5, joined with ``|`` for
PostgreSQL's ``to_tsquery`` — so no input can inject operators (``NEAR``, ``*``, ``!``, ``:*``)
or make the database raise a syntax error.

Hybrid search ranks by reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009):
each result scores ``Σ 1 / (60 + rank)`` over the vector and keyword rankings it appears
in, so neither ranking's raw scores (cosine vs. BM25 / ts_rank) need calibrating.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

RRF_K = 60
MAX_TERMS = 32
_WORD = re.compile(r"[^\W_]+")
_STOPWORD_TEXT = (
    "a an and are as at be been but by can do does for from had has have how i if in into is "
    "it its me my no not of on or our so than that the their them then there these they this "
    "to us was we were what when where which who why will with would you your")
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def keyword_terms(query: str) -> list[str]:
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    meaningful = [w for w in words if w not in STOPWORDS]
    return (meaningful or words)[:MAX_TERMS]


def fts5_query(terms: Sequence[str]) -> str:
    return " OR ".join(f'"{t}"' for t in terms)


def tsquery(terms: Sequence[str]) -> str:
    return " | ".join(terms)


def fuse(rankings: Sequence[Sequence[tuple[int, float]]], k: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of rankings of ``(chunk_id, score)``, best first; the top
    ``k`` as ``(chunk_id, rrf_score)``, ties broken by chunk id."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (chunk_id, _score) in enumerate(ranking, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return [(cid, round(score, 6)) for cid, score in ranked[:k]]
