"""Knowledge bases over HTTP (under /api/v1; roles in flow_engine/auth.py ROUTE_ROLES):

    POST   /knowledge                         create a base (editor)
    GET    /knowledge · /knowledge/{kb}       list · one, with counts and status (runner)
    DELETE /knowledge/{kb}                    delete a base and its documents (admin)
    POST   /knowledge/{kb}/documents          upload (editor): multipart ``file`` (+ ``name``,
                                              ``metadata`` fields) or JSON ``{name, text,
                                              metadata?}`` → 202 and the queued document
    GET    /knowledge/{kb}/documents[/{doc}]  list (``?status=``) · one (runner)
    DELETE /knowledge/{kb}/documents/{doc}    delete a document (editor)
    POST   /knowledge/{kb}/search             ``{query, k, mode, filter?}`` → hits (runner)

``{kb}`` is a base's id or name, ``{doc}`` a document's id or name. Uploads are read into
memory, never into a file: the multipart parser gets an in-memory stream factory and a
bound of ``FLOW_ENGINE_MAX_UPLOAD_BYTES`` (413 beyond it, before the body is read when the
client declares its length). A JSON document's body is scanned before it is parsed: one that
holds more objects, arrays or members than a document can have is refused (422) without
json.loads, which would cost far more memory and time than the body's size.
"""

from __future__ import annotations

import io
import re
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import parse_form_data

from flow_engine import jsontext
from flow_engine.api.common import (
    UnsupportedMediaType,
    int_arg,
    json_body,
    parse_json,
    principal,
    read_body,
)
from flow_engine.components.openai_compat import ProviderError
from flow_engine.errors import BadRequest, PayloadTooLarge, Problem
from flow_engine.knowledge import parse
from flow_engine.knowledge.errors import (
    EmbeddingFailed,
    KnowledgeInvalid,
    KnowledgeUnavailable,
)
from flow_engine.knowledge.model import (
    MAX_METADATA_KEYS,
    KnowledgeBase,
    document_name,
    parse_metadata,
    parse_search,
)
from flow_engine.knowledge.service import KnowledgeService
from flow_engine.knowledge.vocab import STATUSES

bp = Blueprint("knowledge", __name__)
EXTENSION = "flowgate_knowledge"
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields around the file

# A JSON document is {name, text, metadata?} with flat metadata (model.parse_metadata: at most
# MAX_METADATA_KEYS keys, scalar values): 2 objects, at most 35 ':' and 33 ',' and 69
# strings. json.loads of a body made of many small containers or members costs ~50 times its
# size ([{},{},...] of 20 MiB: 8 s and 1 GB), all before the shape can be checked; so the
# body's bytes are scanned first and anything far beyond what a document can hold is refused.
# The bounds leave room for a few mistakes, which then get their precise 422 from the parse.
MAX_JSON_CONTAINERS = 8  # '{' and '[' outside strings
MAX_JSON_MEMBERS = 4 * (3 + MAX_METADATA_KEYS)  # ',' and ':' outside strings; and strings
# A JSON string, matched in linear time: possessive repeats, and an unterminated string runs
# to the end of the body (so a failed match is never retried from each later quote, which
# makes r'"(?:[^"\\]|\\.)*"' quadratic on a body of escaped quotes without a closing one).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)


def knowledge() -> KnowledgeService:
    service = current_app.extensions.get(EXTENSION)
    if service is None:
        raise KnowledgeUnavailable("knowledge bases are not enabled on this engine")
    return service


def base_json(service: KnowledgeService, kb: KnowledgeBase,
              counts: dict[str, int] | None = None) -> dict[str, Any]:
    counts = counts or service.store.counts([kb.id])[kb.id]
    busy = counts["queued"] + counts["indexing"]
    return {"id": kb.id, "name": kb.name, "embedding": kb.embedding.as_dict(),
            "chunking": kb.chunking.as_dict(), "dimensions": kb.dimensions,
            "status": "indexing" if busy else ("ready" if counts["documents"] else "empty"),
            "documents": {k: counts[k] for k in ("queued", "indexing", "ready", "failed")} |
            {"total": counts["documents"]},
            "chunks": counts["chunks"], "created_by": kb.created_by,
            "created_at": kb.created_at.isoformat(), "updated_at": kb.updated_at.isoformat()}


@bp.post("/knowledge")
def create_knowledge():
    service = knowledge()
    kb = service.create(json_body(), principal().actor)
    return jsonify(base_json(service, kb)), 201, {"Location": f"/api/v1/knowledge/{kb.id}"}


@bp.get("/knowledge")
def list_knowledge():
    service = knowledge()
    limit, offset = int_arg("limit", 100, 1, 1000), int_arg("offset", 0, 0, 10**9)
    bases = service.bases(limit, offset)
    counts = service.store.counts([kb.id for kb in bases])
    return jsonify({"knowledge": [base_json(service, kb, counts[kb.id]) for kb in bases],
                    "limit": limit, "offset": offset})


@bp.get("/knowledge/<kb_ref>")
def get_knowledge(kb_ref: str):
    service = knowledge()
    return jsonify(base_json(service, service.base(kb_ref)))


@bp.delete("/knowledge/<kb_ref>")
def delete_knowledge(kb_ref: str):
    knowledge().delete(kb_ref)
    return "", 204


@bp.post("/knowledge/<kb_ref>/documents")
def upload_document(kb_ref: str):
    service = knowledge()
    service.base(kb_ref)  # 404 before reading a body for a base that does not exist
    limit = service.settings.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + _FORM_OVERHEAD:
        raise PayloadTooLarge(f"the upload is {request.content_length} bytes; the limit is "
                              f"{limit} (FLOW_ENGINE_MAX_UPLOAD_BYTES)")
    if request.mimetype == "multipart/form-data":
        name, kind, data, metadata = _multipart(limit)
    elif request.mimetype == "application/json":
        name, kind, data, metadata = _json_document(limit + _FORM_OVERHEAD)
    else:
        raise UnsupportedMediaType("upload a file as multipart/form-data (field 'file') or send "
                                   'JSON {"name", "text", "metadata"}; got '
                                   f"{request.mimetype or 'no Content-Type'}")
    if len(data) > limit:
        raise PayloadTooLarge(f"the document is {len(data)} bytes; the limit is {limit} "
                              "(FLOW_ENGINE_MAX_UPLOAD_BYTES)")
    doc = service.upload(kb_ref, name, kind=kind, data=data, metadata=metadata,
                         actor=principal().actor)
    location = f"/api/v1/knowledge/{doc.kb_id}/documents/{doc.id}"
    return jsonify(doc.as_json()), 202, {"Location": location}


def _memory_stream(total_content_length, content_type, filename, content_length=None):
    return io.BytesIO()  # never a temporary file: uploads stay in memory (bounded above)


def _multipart(limit: int) -> tuple[str, str, bytes, dict[str, Any]]:
    try:
        _, form, files = parse_form_data(
            request.environ, stream_factory=_memory_stream, silent=False,
            max_content_length=limit + _FORM_OVERHEAD, max_form_memory_size=_FORM_OVERHEAD,
            max_form_parts=8)
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"the upload is over the {limit} byte limit "
                              "(FLOW_ENGINE_MAX_UPLOAD_BYTES)") from None
    except ValueError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    uploaded = files.getlist("file")
    if len(uploaded) != 1:
        raise BadRequest("send exactly one file, in the multipart field 'file'")
    storage = uploaded[0]
    name = document_name(form.get("name") or storage.filename)
    if name is None:
        raise KnowledgeInvalid([Problem("$.name", "the document needs a name of 1-200 "
                                        "characters without control characters")])
    kind = parse.kind_of(name if "." in name else storage.filename, storage.mimetype)
    metadata = _metadata(parse_json(form["metadata"]) if form.get("metadata") else {})
    return name, kind, storage.stream.getvalue(), metadata


def _json_document(limit: int) -> tuple[str, str, bytes, dict[str, Any]]:
    data = _upload_body(limit)
    _check_json_shape(data)
    body = parse_json(data)
    if not isinstance(body, dict):
        raise KnowledgeInvalid([Problem("$", 'send {"name", "text", "metadata"}')])
    problems = [Problem(f"$.{k}", "unknown key (allowed: metadata, name, text)")
                for k in body if k not in ("name", "text", "metadata")]
    name = document_name(body.get("name"))
    if name is None:
        problems.append(Problem("$.name", "name must be 1-200 characters without control "
                                "characters"))
    text = body.get("text")
    if not isinstance(text, str):
        problems.append(Problem("$.text", "text must be a string"))
    metadata = parse_metadata(body.get("metadata"), "$.metadata",
                              lambda path, msg: problems.append(Problem(path, msg)))
    problems += _not_text({"$.name": body.get("name"), "$.text": text}, metadata)
    if problems:
        raise KnowledgeInvalid(problems)
    kind = parse.KINDS.get("." + name.rsplit(".", 1)[-1].lower(), "text") if "." in name else "text"
    if kind == "pdf":
        kind = "text"  # JSON carries text, whatever the name says
    return name, kind, text.encode("utf-8"), metadata


def _upload_body(limit: int) -> bytes:
    """A JSON document's body, read up to the upload limit: ``json_body`` stops at
    FLOW_ENGINE_MAX_BODY_BYTES, meant for flows and run requests, not for documents. A body
    of unknown length (chunked) is read one byte past the limit, and over is 413."""
    data = read_body(limit)
    if data is None:
        raise PayloadTooLarge(f"the upload is over the {limit - _FORM_OVERHEAD} byte limit "
                              "(FLOW_ENGINE_MAX_UPLOAD_BYTES)")
    if not data:
        raise BadRequest('send the document as JSON {"name", "text", "metadata"}')
    return data


def _check_json_shape(data: bytes) -> None:
    """Refuses, before it is parsed, a JSON body that holds more objects, arrays, members or
    strings than a document can (422, naming the bound): counted outside strings, in C-speed
    passes over the bytes. For valid JSON the strings found here are JSON's own, so the counts
    are exact; for invalid JSON json.loads stops at the first error, and up to it the two
    agree. UTF-16 and UTF-32 JSON (json.loads guesses them from NUL bytes) would hide the
    structure from a scan of bytes: a body with a NUL byte is 400 (JSON between systems is
    UTF-8, RFC 8259; a NUL character in a string is refused anyway)."""
    if b"\x00" in data:
        raise BadRequest("send the document as UTF-8 JSON: the body holds NUL bytes")
    containers = members = start = 0

    def count(end: int) -> None:
        nonlocal containers, members
        containers += data.count(b"{", start, end) + data.count(b"[", start, end)
        members += data.count(b",", start, end) + data.count(b":", start, end)
        if containers > MAX_JSON_CONTAINERS:
            _too_complex(f"more than {MAX_JSON_CONTAINERS} objects or arrays")
        if members > MAX_JSON_MEMBERS:
            _too_complex(f"more than {MAX_JSON_MEMBERS} members or items")

    for strings, found in enumerate(_JSON_STRING.finditer(data), 1):
        if strings > MAX_JSON_MEMBERS + 1:
            _too_complex(f"more than {MAX_JSON_MEMBERS + 1} strings")
        count(found.start())
        start = found.end()
    count(len(data))


def _too_complex(what: str) -> None:
    raise KnowledgeInvalid([Problem("$", f"the body holds {what}; a document is {{name, text, "
                                         f"metadata}} with at most {MAX_METADATA_KEYS} metadata "
                                         "keys of string, number or boolean values")])


def _not_text(fields: dict[str, Any], metadata: dict[str, Any]) -> list[Problem]:
    """A problem for each string holding a lone surrogate (``"\\ud800"`` is valid JSON but
    half of a UTF-16 pair, not a character): no store keeps it, UTF-8 cannot encode it.
    (Metadata keys are refused by parse_metadata's key rule already.)"""
    strings = {**fields, **{f"$.metadata.{k}": v for k, v in metadata.items()}}
    return [Problem(path, "holds a lone surrogate (\\ud800-\\udfff, half of a UTF-16 pair), "
                          "which is not text: send the character it was part of")
            for path, value in strings.items()
            if isinstance(value, str) and not jsontext.encodable(value)]


def _metadata(raw: Any) -> dict[str, Any]:
    problems: list[Problem] = []
    metadata = parse_metadata(raw, "$.metadata", lambda p, m: problems.append(Problem(p, m)))
    problems += _not_text({}, metadata)
    if problems:
        raise KnowledgeInvalid(problems)
    return metadata


@bp.get("/knowledge/<kb_ref>/documents")
def list_documents(kb_ref: str):
    limit, offset = int_arg("limit", 100, 1, 1000), int_arg("offset", 0, 0, 10**9)
    status = request.args.get("status")
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    docs = knowledge().documents(kb_ref, limit, offset, status)
    return jsonify({"documents": [d.as_json() for d in docs], "limit": limit, "offset": offset})


@bp.get("/knowledge/<kb_ref>/documents/<doc_ref>")
def get_document(kb_ref: str, doc_ref: str):
    return jsonify(knowledge().document(kb_ref, doc_ref).as_json())


@bp.delete("/knowledge/<kb_ref>/documents/<doc_ref>")
def delete_document(kb_ref: str, doc_ref: str):
    knowledge().delete_document(kb_ref, doc_ref)
    return "", 204


@bp.post("/knowledge/<kb_ref>/search")
def search(kb_ref: str):
    service = knowledge()
    query = parse_search(json_body())
    try:
        hits = service.search(kb_ref, query)
    except ProviderError as exc:
        raise EmbeddingFailed(f"the query could not be embedded: {exc}") from None
    return jsonify({"knowledge_id": service.base(kb_ref).id, "mode": query.mode, "k": query.k,
                    "hits": [h.as_json() for h in hits]})


def openapi_paths() -> dict[str, Any]:
    """These routes in OpenAPI 3.1 (merged into GET /api/v1/openapi.json)."""
    error = {"description": "error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}
    kb = {"name": "kb_ref", "in": "path", "required": True, "schema": {"type": "string"},
          "description": "knowledge base id or name"}
    doc = {"name": "doc_ref", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "document id or name"}
    page = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                        "maximum": 1000}},
            {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}]
    obj = {"type": "object"}
    base = {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "embedding": obj, "chunking": obj,
        "dimensions": {"type": ["integer", "null"]},
        "status": {"enum": ["empty", "indexing", "ready"]}, "documents": obj,
        "chunks": {"type": "integer"}}}
    document = {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "status": {"enum": list(STATUSES)},
        "chunks": {"type": "integer"}, "error": {"type": "string"}, "metadata": obj}}
    create = {"type": "object", "required": ["name", "embedding"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"},
        "embedding": {"type": "object", "required": ["model"], "properties": {
            "provider": {"enum": ["openai"]}, "model": {"type": "string"},
            "dimensions": {"type": "integer"}, "base_url": {"type": "string"}}},
        "chunking": {"type": "object", "properties": {"size": {"type": "integer"},
                                                      "overlap": {"type": "integer"}}}}}
    search_body = {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string"}, "k": {"type": "integer", "minimum": 1, "maximum": 100},
        "mode": {"enum": ["vector", "keyword", "hybrid"]},
        "filter": {"type": "object", "properties": {"metadata": obj}}}}
    hits = {"type": "object", "properties": {"hits": {"type": "array", "items": {
        "type": "object", "properties": {
            "document": {"type": "string"}, "document_id": {"type": "string"},
            "chunk": {"type": "integer"}, "text": {"type": "string"},
            "score": {"type": "number"}, "metadata": obj}}}}}

    def op(summary, schema, *, status="200", body=None, params=(), errors=(401, 404, 503)):
        out: dict[str, Any] = {"summary": summary, "tags": ["knowledge"], "responses": {
            status: {"description": summary, "content": {"application/json": {"schema": schema}}}
            if schema else {"description": summary}}}
        out["responses"].update({str(code): error for code in errors})
        if body is not None:
            out["requestBody"] = {"required": True, "content": body}
        if params:
            out["parameters"] = list(params)
        return out

    json_body = lambda schema: {"application/json": {"schema": schema}}  # noqa: E731
    upload = {"multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                 "properties": {
        "file": {"type": "string", "contentMediaType": "application/octet-stream"},
        "name": {"type": "string"}, "metadata": {"type": "string"}}}},
              "application/json": {"schema": {"type": "object", "required": ["name", "text"],
                                              "properties": {"name": {"type": "string"},
                                                             "text": {"type": "string"},
                                                             "metadata": obj}}}}
    return {
        "/api/v1/knowledge": {
            "get": op("list knowledge bases", {"type": "object"}, params=page,
                      errors=(400, 401, 503)),
            "post": op("create a knowledge base", base, status="201", body=json_body(create),
                       errors=(400, 401, 409, 415, 422, 503))},
        "/api/v1/knowledge/{kb_ref}": {
            "get": op("a knowledge base, with counts and status", base, params=[kb]),
            "delete": op("delete a knowledge base and its documents", None, status="204",
                         params=[kb])},
        "/api/v1/knowledge/{kb_ref}/documents": {
            "get": op("its documents", {"type": "object"}, params=[kb, *page, {
                "name": "status", "in": "query", "schema": {"enum": list(STATUSES)}}],
                errors=(400, 401, 404, 503)),
            "post": op("upload a document (.txt, .md, .html, .pdf); indexed in the background",
                       document, status="202", body=upload, params=[kb],
                       errors=(400, 401, 404, 413, 415, 422, 503))},
        "/api/v1/knowledge/{kb_ref}/documents/{doc_ref}": {
            "get": op("a document and its indexing status", document, params=[kb, doc]),
            "delete": op("delete a document", None, status="204", params=[kb, doc])},
        "/api/v1/knowledge/{kb_ref}/search": {
            "post": op("search by meaning, keywords or both", hits, body=json_body(search_body),
                       params=[kb], errors=(400, 401, 404, 415, 422, 502, 503))},
    }
