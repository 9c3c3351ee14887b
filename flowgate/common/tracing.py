"""W3C Trace Context (``traceparent``) and request ids, shared by engine and ambassador.

``traceparent: 00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>``; all-zero ids
and version ``ff`` are invalid (https://www.w3.org/TR/trace-context/#traceparent-header).
A valid incoming header is kept as it is; otherwise a new trace starts here.
"""

from __future__ import annotations

import contextvars
import re
import secrets
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,200}$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    span_id: str
    traceparent: str
    request_id: str

    def child(self) -> TraceContext:
        """A new span in the same trace (what a hop forwards upstream)."""
        span = secrets.token_hex(8)
        flags = self.traceparent[-2:] if len(self.traceparent) >= 55 else "01"
        return TraceContext(self.trace_id, span, f"00-{self.trace_id}-{span}-{flags}",
                            self.request_id)


current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "flowgate_trace", default=None
)


def parse_traceparent(header: str | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_id, flags)`` of a valid header, else None."""
    if not header:
        return None
    match = _TRACEPARENT.match(header.strip())  # upper-case hex is invalid (W3C): not lowered
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, flags


def from_headers(traceparent: str | None, request_id: str | None) -> TraceContext:
    """Keep a valid incoming trace and request id; make up what is missing or invalid."""
    parsed = parse_traceparent(traceparent)
    if parsed:
        trace_id, parent_id, _flags = parsed
        header = traceparent.strip()
        span = parent_id
    else:
        trace_id, span = secrets.token_hex(16), secrets.token_hex(8)
        header = f"00-{trace_id}-{span}-01"
    rid = request_id.strip() if request_id and _REQUEST_ID.match(request_id.strip()) else trace_id
    return TraceContext(trace_id, span, header, rid)
