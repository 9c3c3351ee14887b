"""What every handler needs: the engine's services, JSON bodies, auth, SSE framing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, request

from flow_engine.auth import (
    IDENTITY_HEADER,
    TENANT_HEADER,
    ApiKey,
    CallerHeaderError,
    KeyRing,
    Principal,
    principal_for,
    required_role,
)
from flow_engine.config import Settings
from flow_engine.errors import BadRequest, FlowgateError, Forbidden
from flow_engine.metrics import EngineMetrics
from flow_engine.runs.service import RunService
from flow_engine.service import FlowService
from flow_engine.store.base import FlowStore


class Unauthorized(FlowgateError):
    status, code = 401, "unauthorized"


class UnsupportedMediaType(FlowgateError):
    status, code = 415, "unsupported_media_type"


@dataclass
class Engine:
    """Everything a request handler may use, built once per app by create_app."""

    settings: Settings
    store: FlowStore
    metrics: EngineMetrics
    flows: FlowService
    runs: RunService
    keys: KeyRing


def engine() -> Engine:
    return current_app.extensions["flowgate"]


def principal() -> Principal:
    """The caller of this request (set by :func:`authenticate` for every /api/v1 path)."""
    return g.principal


def json_body(*, required: bool = True) -> Any:
    """The request's JSON body; 415 for another content type, 400 for malformed JSON."""
    if not request.content_length and not request.data:
        if required:
            raise BadRequest("this endpoint needs a JSON body (Content-Type: application/json)")
        return None
    if not request.is_json:
        raise UnsupportedMediaType(
            f"expected Content-Type: application/json, got {request.content_type or 'none'}")
    return parse_json(request.get_data(cache=True))


def parse_json(data: bytes | str) -> Any:
    """JSON from a client: 400 when malformed, not UTF-8, or nested too deeply."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


MAX_JSON_DEPTH = 64  # flow definitions need about 6; deep nesting only costs (and recurses)


def json_depth(value: Any) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return deepest


_NO_AUTH = ApiKey("anonymous", "admin", True, b"")


def authenticate() -> Principal:
    """Who calls: ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (or ``?token=<key>``
    on a WebSocket handshake: browsers cannot set its headers), compared in constant time;
    then the role this endpoint needs (:data:`flow_engine.auth.ROUTE_ROLES`)."""
    keys = engine().keys
    if not keys:  # started with --insecure-no-auth: every caller is an admin proxy
        key: ApiKey | None = _NO_AUTH
    else:
        presented = (request.headers.get("x-api-key") or "").strip()
        auth = request.headers.get("Authorization", "")
        if not presented and auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        if not presented and request.url_rule is not None and request.url_rule.websocket:
            presented = request.args.get("token", "").strip()
        if not presented:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or "
                               "'x-api-key: <key>'")
        key = keys.find(presented)
        if key is None:
            raise Unauthorized("invalid API key")
    try:
        caller = principal_for(key, request.headers.get(IDENTITY_HEADER),
                               request.headers.get(TENANT_HEADER))
    except CallerHeaderError as exc:
        raise BadRequest(str(exc)) from None
    g.principal = caller
    if request.url_rule is not None:  # an unknown path is a 404 for any key
        needed = required_role(request.endpoint)
        if not caller.may(needed):
            raise Forbidden(f"this needs the {needed} role; key '{caller.key}' has the "
                            f"{caller.role} role", role=needed)
    return caller


# One encoder for every event: json.dumps builds a new one per call when given options.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def sse(event_id: int | None, event: str, data: Any) -> bytes:
    """One Server-Sent Event: ``id:``, ``event:``, ``data:`` lines and a blank line. Compact
    JSON never holds a line break (JSON escapes them in strings), so ``data:`` is one line."""
    head = f"id: {event_id}\nevent: {event}\ndata: " if event_id is not None else f"event: {event}\ndata: "
    return (head + _encode_json(data) + "\n\n").encode()


KEEPALIVE = b": keep-alive\n\n"
