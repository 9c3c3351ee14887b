"""The ambassador's request path: a chain of filters ending in the upstream call.

Like Envoy's HTTP filter chain: filters run in configured order on the way in and the
response unwinds through them in reverse. Each filter is ``__call__(request, next)`` and
may answer by itself (cache hit, 401, open breaker) instead of calling ``next``. Filters
never import each other; what they share travels on the request (``request.ctx``) and the
response (``response.meta``).

    observe → validate → trace → auth → ratelimit → fallback → cache → breaker → retry
        → timeout → fault → upstream

``observe`` and ``validate`` are always there (ambassador/pipeline.py); the rest are the
configured ``filters``. ambassador/wsgi.py turns a WSGI environ into a :class:`Request` and
the :class:`Response` back into WSGI, for every proxied route.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Request:
    """What the app asked for. The adapter fills in the method, the route and the headers
    (``ctx["environ"]`` holds the rest); the validate filter parses and checks the body
    and sets ``path`` (the engine's), ``body``, ``flow_id`` and ``stream``."""

    method: str
    path: str  # the engine path this request maps to, e.g. /api/v1/run/faq-rag
    headers: dict[str, str]  # lower-case names; only what may go upstream
    route: str  # the ambassador route, e.g. /run-flow (metrics, logs)
    body: dict[str, Any] | None = None
    flow_id: str | None = None
    stream: bool = False
    # shared by filters: trace, identity, deadline, attempts, ...
    ctx: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass
class Response:
    """An answer: a JSON/bytes body, or an iterator of chunks for a stream."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunks: Iterator[bytes] | None = None  # set for streamed answers
    meta: dict[str, Any] = field(default_factory=dict)  # cache result, attempts, ...
    # run once the answer has gone out (the server closed it): metrics, the access line
    after: list[Callable[[], None]] = field(default_factory=list)

    @property
    def streamed(self) -> bool:
        return self.chunks is not None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


Handler = Callable[[Request], Response]


class Filter(Protocol):
    name: str

    def __call__(self, request: Request, next: Handler) -> Response: ...


def build_chain(filters: Sequence[Filter], terminal: Handler) -> Handler:
    """Compose ``filters`` (outermost first) around ``terminal``."""
    handler = terminal
    for f in reversed(filters):
        handler = _link(f, handler)
    return handler


def _link(f: Filter, next_handler: Handler) -> Handler:
    def handle(request: Request) -> Response:
        return f(request, next_handler)

    handle.__name__ = f"filter_{getattr(f, 'name', type(f).__name__)}"
    return handle


def error_response(status: int, code: str, message: str, request: Request | None = None, *,
                   headers: Mapping[str, str] | None = None, **details: Any) -> Response:
    """A response in the error contract: ``{"error": {"code", "message", "trace_id"}}``."""
    trace = request.ctx.get("trace") if request is not None else None
    body = {"code": code, "message": message, "trace_id": trace.trace_id if trace else None}
    body.update(details)
    return Response(status, {"Content-Type": "application/json", **(headers or {})},
                    json.dumps({"error": body}).encode())


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, {"Content-Type": "application/json", **(headers or {})},
                    json.dumps(payload, separators=(",", ":")).encode())


def note(request: Request, name: str, **attributes: Any) -> None:
    """A decision (a retry, an open breaker) as an event on the request's span, when the
    ambassador exports spans (``flowgate/common/otel.py``)."""
    span = request.ctx.get("span")
    if span is not None:
        span.add_event(name, attributes)


def chunks_of(body: Iterable[bytes]) -> Iterator[bytes]:
    yield from body
