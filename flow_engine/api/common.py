"""What every handler needs: the engine's services, JSON bodies, auth, SSE framing."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from flask import current_app, request

from flow_engine.config import Settings
from flow_engine.errors import BadRequest, FlowgateError
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
    api_keys: tuple[bytes, ...]


def engine() -> Engine:
    return current_app.extensions["flowgate"]


def json_body(*, required: bool = True) -> Any:
    """The request's JSON body; 415 for another content type, 400 for malformed JSON."""
    if not request.content_length and not request.data:
        if required:
            raise BadRequest("this endpoint needs a JSON body (Content-Type: application/json)")
        return None
    if not request.is_json:
        raise UnsupportedMediaType(
            f"expected Content-Type: application/json, got {request.content_type or 'none'}")
    try:
        return json.loads(request.get_data(cache=True))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None


def check_api_key() -> None:
    """``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (or ``?token=<key>`` on a
    WebSocket handshake: browsers cannot set its headers), compared in constant time."""
    keys = engine().api_keys
    if not keys:  # started with --insecure-no-auth
        return
    presented = (request.headers.get("x-api-key") or "").strip()
    auth = request.headers.get("Authorization", "")
    if not presented and auth[:7].lower() == "bearer ":
        presented = auth[7:].strip()
    if not presented and request.url_rule is not None and request.url_rule.websocket:
        presented = request.args.get("token", "").strip()
    if not presented:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    candidate = presented.encode()
    ok = False
    for key in keys:  # no early exit: timing does not reveal which key matched
        ok |= hmac.compare_digest(candidate, key)
    if not ok:
        raise Unauthorized("invalid API key")


# One encoder for every event: json.dumps builds a new one per call when given options.
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def sse(event_id: int | None, event: str, data: Any) -> bytes:
    """One Server-Sent Event: ``id:``, ``event:``, ``data:`` lines and a blank line. Compact
    JSON never holds a line break (JSON escapes them in strings), so ``data:`` is one line."""
    head = f"id: {event_id}\nevent: {event}\ndata: " if event_id is not None else f"event: {event}\ndata: "
    return (head + _encode_json(data) + "\n\n").encode()


KEEPALIVE = b": keep-alive\n\n"
