"""``POST /run-flow``, every app's one call: its body read, checked and made the engine's
run call (:func:`parse`, run by the validate filter; ambassador/filters/validate.py)."""

from __future__ import annotations

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from ambassador import hygiene
from ambassador.chain import Request, Response, error_response
from ambassador.config import Settings
from flowgate.common.run_request import RUN_FLOW_FIELDS, check_run_body

__all__ = ["RUN_FLOW_FIELDS", "parse"]


def parse(request: Request, settings: Settings) -> Response | None:
    """The body of a ``POST /run-flow``, read from ``request.ctx["environ"]`` and checked;
    the refusal (415, 413, 408, 400), or None with ``request`` made the engine's run call."""
    environ = request.ctx["environ"]
    mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        return error_response(415, "unsupported_media_type",
                              "expected Content-Type: application/json", request)
    limit = settings.max_body_bytes
    length = environ.get("CONTENT_LENGTH")
    length = int(length) if length and length.isascii() and length.isdigit() else None
    if length is not None and length > limit:
        return error_response(413, "payload_too_large", f"the body is larger than {limit} bytes",
                              request)
    try:
        data = environ["wsgi.input"].read(length if length is not None else limit + 1)
    except TimeoutError as exc:  # flowgate.common.gevent_worker.BodyTimeout: the body stalled
        # the rest of the body may still come: the connection cannot be reused
        return error_response(408, "request_timeout", str(exc), request,
                              headers={"Connection": "close"})
    if len(data) > limit:
        return error_response(413, "payload_too_large", f"the body is larger than {limit} bytes",
                              request)
    try:
        body = hygiene.loads(data)
    except hygiene.BadJson as exc:
        return error_response(400, "bad_request", f"bad JSON body: {exc}", request)
    problem = check_run_body(body)  # the rules the engine applies too
    if problem:
        return error_response(400, "bad_request", problem, request)
    accept = request.header("accept") or ""
    stream = bool(body.get("stream")) or (
        "text/event-stream" in accept
        and MIMEAccept(parse_accept_header(accept)).best == "text/event-stream")
    upstream_body = {"input_value": body.get("input")}
    for name in ("session_id", "tweaks", "version", "input_type", "output_type",
                 "on_disconnect"):
        if body.get(name) is not None:
            upstream_body[name] = body[name]
    request.path = f"/api/v1/run/{body['flow_id']}" + ("?stream=true" if stream else "")
    request.body, request.flow_id, request.stream = upstream_body, body["flow_id"], stream
    return None
