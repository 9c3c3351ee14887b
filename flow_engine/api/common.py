"""What every handler needs: the engine's services, JSON bodies, auth, SSE framing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from flow_engine import jsontext
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
from flow_engine.errors import BadRequest, FlowgateError, Forbidden, PayloadTooLarge
from flow_engine.metrics import EngineMetrics
from flow_engine.runs.service import RunService
from flow_engine.service import FlowService
from flow_engine.store.base import FlowStore
from flowgate.common.credentials import presented_key


class Unauthorized(FlowgateError):
    status, code = 401, "unauthorized"


class UnsupportedMediaType(FlowgateError):
    status, code = 415, "unsupported_media_type"


class RequestTimeout(FlowgateError):
    status, code = 408, "request_timeout"


@dataclass
class Engine:
    """Everything a request handler may use, built once per app by create_app."""

    settings: Settings
    store: FlowStore
    metrics: EngineMetrics
    flows: FlowService
    runs: RunService
    keys: KeyRing
    maintenance: Any = None  # flow_engine/maintenance.py (its thread runs by itself)
    rollouts: Any = None  # flow_engine/rollouts/controller.py (likewise)
    tickets: Any = None  # flow_engine/ws_tickets.py: one-time WebSocket tickets
    figures: Any = None  # flow_engine/rollouts/figures.py: recent per-version figures


def engine() -> Engine:
    return current_app.extensions["flowgate"]


def principal() -> Principal:
    """The caller of this request (set by :func:`authenticate` for every /api/v1 path)."""
    return g.principal


def json_body(*, required: bool = True) -> Any:
    """The request's JSON body; 415 for another content type, 400 for malformed JSON, 413
    over ``max_body_bytes`` (also for a chunked body), 408 when it does not arrive in time."""
    data = body_bytes()
    if not data:
        if required:
            raise BadRequest("this endpoint needs a JSON body (Content-Type: application/json)")
        return None
    if not request.is_json:
        raise UnsupportedMediaType(
            f"expected Content-Type: application/json, got {request.content_type or 'none'}")
    return parse_json(data)


def body_bytes() -> bytes:
    """The whole request body, at most ``max_body_bytes``. Werkzeug refuses a Content-Length
    over the limit (413) but reads a chunked body only up to it, and what it read parsed as
    if it were all: here a body of unknown length is read one byte past the limit, and
    over is 413. The server's body timeout (flowgate/common/gevent_worker.py) surfaces as a 408."""
    cached = g.get("body")
    if cached is not None:
        return cached
    limit = engine().settings.max_body_bytes
    data = read_body(limit)
    if data is None:
        raise PayloadTooLarge(f"request body over the {limit} byte limit")
    g.body = data
    return data


def read_body(limit: int) -> bytes | None:
    """The request's body when it is at most ``limit`` bytes, else None (its declared length
    over it, or — a body of unknown length, read one byte past the limit — its bytes). A
    body that ends before its declared length is a 400, the server's body timeout a 408."""
    request.max_content_length = limit
    try:
        if request.content_length is not None:
            data = request.get_data(cache=True)  # werkzeug: 413 above max_content_length
        else:
            data = _read_at_most(request.environ["wsgi.input"], limit + 1)
    except RequestEntityTooLarge:
        return None
    except ClientDisconnected as exc:
        if isinstance(exc.__context__, TimeoutError):
            raise RequestTimeout(str(exc.__context__)) from None
        raise BadRequest("the request body ended before its declared length") from None
    except TimeoutError as exc:
        raise RequestTimeout(str(exc)) from None
    return None if len(data) > limit else data


def _read_at_most(stream: Any, size: int) -> bytes:
    parts, left = [], size
    while left > 0:
        part = stream.read(min(left, 1 << 20))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def parse_json(data: bytes | str) -> Any:
    """JSON from a client: 400 when malformed, not UTF-8, nested too deeply, holding NaN or
    Infinity (not JSON), a number too long for Python's int limit, or a NUL character in
    any string (no store can keep one: PostgreSQL refuses it in text)."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, int digit limit, NaN
        raise BadRequest(f"malformed JSON: {str(exc)[:200]}") from None
    problem = json_problem(value)
    if problem:
        raise BadRequest(problem)
    return value


MAX_JSON_DEPTH = 64  # flow definitions need about 6; deep nesting only costs (and recurses)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_problem(value: Any) -> str | None:
    """Why a parsed JSON value cannot be taken (too deep, a NUL in a string), or None;
    one pass, without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "JSON strings may not contain NUL (\\u0000)"
            continue
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        stack.extend((child, depth + 1) for child in children)
    return None


_NO_AUTH = ApiKey("anonymous", "admin", True, b"")
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def check_host(host: str, allowed: tuple[str, ...]) -> None:
    """Without keys (--insecure-no-auth) anything that reaches the engine may use it, so only
    loopback Host names are answered (and ``allowed``): a web page whose DNS name was
    rebound to 127.0.0.1 is refused, though the browser thinks it is that page's origin."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name.lower() not in LOOPBACK_HOSTS and name.lower() not in {h.lower() for h in allowed}:
        raise Forbidden(f"Host '{host[:100]}' is not answered by an engine without API keys; "
                        "use localhost, or list the name in FLOW_ENGINE_ALLOWED_HOSTS")


def authenticate() -> Principal:
    """Who calls: ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (or ``?token=<key>``
    on a WebSocket handshake: browsers cannot set its headers), compared in constant time;
    then the role this endpoint needs (:data:`flow_engine.auth.ROUTE_ROLES`)."""
    keys = engine().keys
    if not keys:  # started with --insecure-no-auth: every caller is an admin proxy
        key: ApiKey | None = _NO_AUTH
    else:
        presented = presented_key(request.headers.get("x-api-key"),
                                  request.headers.get("Authorization"))
        websocket = request.url_rule is not None and request.url_rule.websocket
        if not presented and websocket and "ticket" in request.args:
            return _redeem(request.args["ticket"])
        if not presented and websocket:
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
    return _admit(caller)


def _redeem(ticket: str) -> Principal:
    """A WebSocket handshake with a one-time ticket (flow_engine/ws_tickets.py): it acts as
    the principal that asked for the ticket."""
    from flow_engine.api.ws import check_origin

    check_origin()  # a page of another site does not get to use up a ticket
    caller = engine().tickets.redeem(ticket.strip())  # 503 when Redis does not answer
    if caller is None:
        raise Unauthorized("invalid, expired or used WebSocket ticket: ask POST "
                           "/api/v1/ws/ticket for a new one")
    return _admit(caller)


def _admit(caller: Principal) -> Principal:
    g.principal = caller
    if request.url_rule is not None:  # an unknown path is a 404 for any key
        needed = required_role(request.endpoint)
        if not caller.may(needed):
            raise Forbidden(f"this needs the {needed} role; key '{caller.key}' has the "
                            f"{caller.role} role", role=needed)
    return caller


def sse(event_id: int | None, event: str, data: Any) -> bytes:
    """One Server-Sent Event: ``id:``, ``event:``, ``data:`` lines and a blank line. Compact
    JSON never holds a line break (JSON escapes them in strings), so ``data:`` is one line;
    it is always valid UTF-8, even for text holding a lone surrogate (flow_engine/jsontext.py)."""
    head = f"id: {event_id}\nevent: {event}\ndata: " if event_id is not None else f"event: {event}\ndata: "
    return head.encode() + jsontext.dumps_utf8(data) + b"\n\n"


KEEPALIVE = b": keep-alive\n\n"


def int_arg(name: str, default: Any, low: int, high: int) -> Any:
    """An integer query parameter within [low, high] (400 otherwise); ``default`` if absent."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name} must be between {low} and {high}")
    return value
