"""BM25Retriever: Okapi BM25 ranking over documents given in params (and, optionally,
documents fed by an edge, e.g. a TextSplitter's chunks). Offline, no embeddings.

The index over the params documents is built once when the flow version is compiled;
documents arriving on the ``documents`` input are indexed per run.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable
from pydantic import ConfigDict, PrivateAttr

from flow_engine.components.base import BuildContext, Component, Port

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BM25Index:
    """Okapi BM25 (Robertson & Zaragoza) with the Lucene-style non-negative idf."""

    def __init__(self, documents: Sequence[Document], k1: float = 1.5, b: float = 0.75) -> None:
        self.documents = list(documents)
        self.k1, self.b = k1, b
        self._tfs = [Counter(tokenize(d.page_content)) for d in self.documents]
        self._lengths = [sum(tf.values()) for tf in self._tfs]
        n = len(self.documents)
        self._avgdl = (sum(self._lengths) / n) if n else 0.0
        df: Counter[str] = Counter()
        for tf in self._tfs:
            df.update(tf.keys())
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> list[float]:
        terms = [t for t in tokenize(query) if t in self._idf]
        k1, b, avgdl = self.k1, self.b, self._avgdl or 1.0
        out = []
        for tf, length in zip(self._tfs, self._lengths, strict=True):
            norm = k1 * (1 - b + b * length / avgdl)
            score = 0.0
            for term in terms:
                f = tf.get(term)
                if f:
                    score += self._idf[term] * f * (k1 + 1) / (f + norm)
            out.append(score)
        return out

    def top(self, query: str, k: int) -> list[Document]:
        scores = self.scores(query)
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [
            Document(
                page_content=self.documents[i].page_content,
                metadata={**self.documents[i].metadata, "score": round(scores[i], 6)},
            )
            for i in ranked[:k]
            if scores[i] > 0
        ]


def as_documents(items: Any) -> list[Document]:
    if items is None:
        return []
    if isinstance(items, str | Document | dict):
        items = [items]
    docs = []
    for item in items:
        if isinstance(item, Document):
            docs.append(item)
        elif isinstance(item, dict):
            docs.append(Document(page_content=str(item.get("text", "")),
                                 metadata=dict(item.get("metadata") or {})))
        else:
            docs.append(Document(page_content=str(item)))
    return docs


class FlowBM25Retriever(BaseRetriever):
    """A LangChain retriever over a prebuilt index. Invoked with the query text, or with
    ``{"query": ..., "documents": [...]}`` when documents also arrive by edge."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    k: int = 4
    k1: float = 1.5
    b: float = 0.75
    base_documents: list[Document] = []
    _index: BM25Index = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._index = BM25Index(self.base_documents, self.k1, self.b)

    def _get_relevant_documents(
        self, query: Any, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        if isinstance(query, dict):
            extra = as_documents(query.get("documents"))
            index = BM25Index(self.base_documents + extra, self.k1, self.b) if extra else self._index
            return index.top(str(query.get("query", "")), self.k)
        return self._index.top(str(query), self.k)


_DOC = {
    "oneOf": [
        {"type": "string", "maxLength": 200_000},
        {"type": "object", "required": ["text"], "additionalProperties": False,
         "properties": {"text": {"type": "string"}, "metadata": {"type": "object"}}},
    ]
}


class BM25Retriever(Component):
    type_name = "BM25Retriever"
    display_name = "BM25 Retriever"
    description = "Ranks documents by BM25 relevance to the query; returns the top k."
    outputs = ("documents",)
    input_ports = (
        Port("query", coerce="text"),
        Port("documents", required=False, coerce="any",
             description="more documents, e.g. a TextSplitter's chunks"),
    )
    params_schema = {
        "type": "object",
        "properties": {
            "documents": {"type": "array", "items": _DOC, "maxItems": 10_000, "default": []},
            "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
            "k1": {"type": "number", "minimum": 0, "maximum": 10, "default": 1.5},
            "b": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.75},
        },
    }

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        return FlowBM25Retriever(
            k=params["k"], k1=params["k1"], b=params["b"],
            base_documents=as_documents(params["documents"]),
        )
