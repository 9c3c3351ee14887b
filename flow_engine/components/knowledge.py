"""KnowledgeRetriever: search a knowledge base (flow_engine/knowledge) by meaning, keywords or
both, from a flow. Input: the query text; output: the hits as LangChain Documents (like
BM25Retriever), each with the document's name, chunk number, score and metadata, so the
node's ``node_finished`` event names the documents it found.

The engine hands the component its knowledge service as a lookup (:class:`KnowledgeLookup`)
twice: in ``Limits.extra["knowledge"]`` so that validation reports a base that does not
exist (422 at ``$.nodes[i].params.knowledge_id``), and in ``BuildContext.extra["knowledge"]``
for the retriever to search with. Offline validation (no lookup) checks only the params.
The base's contents are read at run time: documents added or replaced later are found by
already compiled flows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable
from pydantic import ConfigDict

from flow_engine.components.base import BuildContext, Component, Limits, Port
from flow_engine.knowledge.model import Hit, SearchRequest
from flow_engine.knowledge.vocab import MODES

LOOKUP = "knowledge"


class KnowledgeLookup(Protocol):
    def problem(self, kb_ref: str) -> str | None:
        """Why a flow cannot use the base (None: it can)."""

    def search(self, kb_ref: str, request: SearchRequest) -> list[Hit]:
        """The top hits (raises ProviderError when the query cannot be embedded)."""


class FlowKnowledgeRetriever(BaseRetriever):
    """A LangChain retriever over one knowledge base."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    lookup: Any
    knowledge_id: str
    k: int = 4
    mode: str = "hybrid"

    def _get_relevant_documents(self, query: Any, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        text = str(query).strip()
        if not text:
            return []
        hits = self.lookup.search(self.knowledge_id, SearchRequest(text[:4000], self.k, self.mode))
        return [Document(page_content=hit.text, metadata={
            **hit.metadata, "knowledge_id": self.knowledge_id, "document": hit.document,
            "document_id": hit.document_id, "chunk": hit.chunk, "score": hit.score})
            for hit in hits]


class KnowledgeRetriever(Component):
    type_name = "KnowledgeRetriever"
    display_name = "Knowledge Retriever"
    description = ("Searches a knowledge base (uploaded documents) by meaning, keywords or "
                   "both; returns the top k chunks.")
    outputs = ("documents",)
    input_ports = (Port("query", coerce="text", description="what to search for"),)
    params_schema = {
        "type": "object",
        "required": ["knowledge_id"],
        "properties": {
            "knowledge_id": {"type": "string", "minLength": 1, "maxLength": 200,
                             "description": "a knowledge base's id or name"},
            "k": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
            "mode": {"enum": list(MODES), "default": "hybrid"},
        },
    }

    def check_semantics(self, params: Mapping[str, Any], limits: Limits):
        lookup = (getattr(limits, "extra", None) or {}).get(LOOKUP)
        kb = params.get("knowledge_id")
        if lookup is not None and isinstance(kb, str) and kb:
            problem = lookup.problem(kb)
            if problem:
                yield ".knowledge_id", problem

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        lookup = ctx.extra.get(LOOKUP)
        if lookup is None:
            raise ValueError(f"node '{node_id}': knowledge bases are not available on this engine")
        return FlowKnowledgeRetriever(lookup=lookup, knowledge_id=params["knowledge_id"],
                                      k=params["k"], mode=params["mode"])
