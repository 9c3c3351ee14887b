"""Errors of the knowledge API. Each is a :class:`~flow_engine.errors.FlowgateError`, so the
engine's error handler turns it into ``{"error": {"code", "message", "trace_id"}}``.

    KnowledgeNotFound     404 knowledge_not_found   (also: a base of a deleted id)
    DocumentNotFound      404 document_not_found
    KnowledgeInvalid      422 knowledge_invalid     carries every problem with a JSON path
    DocumentInvalid       422 document_invalid      an empty file, undecodable text, not a PDF
    UnsupportedDocument   415 unsupported_media_type  a file type the engine does not read
    EmbeddingFailed       502 embedding_failed      the embedding provider failed a search
    KnowledgeUnavailable  503 knowledge_unavailable the database cannot hold vectors
"""

from __future__ import annotations

from flow_engine.errors import FlowgateError, NotFound, Problem


class KnowledgeNotFound(NotFound):
    code = "knowledge_not_found"


class DocumentNotFound(NotFound):
    code = "document_not_found"


class KnowledgeInvalid(FlowgateError):
    """A request body or query failed validation; ``problems`` lists all of it."""

    status, code = 422, "knowledge_invalid"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        first = str(self.problems[0]) if self.problems else "invalid request"
        more = len(self.problems) - 1
        summary = first + (f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else "")
        super().__init__(summary, problems=[p.as_dict() for p in self.problems])


class DocumentInvalid(FlowgateError):
    status, code = 422, "document_invalid"


class UnsupportedDocument(FlowgateError):
    status, code = 415, "unsupported_media_type"


class EmbeddingFailed(FlowgateError):
    status, code = 502, "embedding_failed"


class KnowledgeUnavailable(FlowgateError):
    status, code = 503, "knowledge_unavailable"


class ParseError(ValueError):
    """A document's bytes could not be turned into text; the message is the reason shown
    on the failed document (never a stack trace)."""
