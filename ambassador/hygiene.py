"""Input checks shared by every route, so that bad input is a 400 here and never a 500 or
something odd upstream.

- Ids (flows, runs) are matched whole (``fullmatch``: ``$`` would accept a trailing
  newline, which then lands in the engine request line).
- Header values the chain may forward must be printable ASCII: a latin-1 byte or a
  control character in ``Idempotency-Key`` or ``X-Request-ID`` is refused, not relayed.
- ``Last-Event-ID`` (header or ``last_event_id``) is ASCII digits (``str.isdigit`` takes
  '²' and '٣').
- ``Idempotency-Key`` is 1-200 printable ASCII characters without spaces, as the engine
  wants it: an empty one was dropped on the way upstream while the retry filter still
  counted on it, so a timed-out run was retried without a key — and ran twice.
- JSON bodies and WebSocket messages nest at most ``MAX_JSON_DEPTH`` levels: about 960
  levels of a 7 KB body made ``json.dumps`` raise RecursionError on the upstream path, a
  500 the circuit breaker counted as an engine failure, so five such requests opened the
  circuit for every caller. Depth is measured without recursion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
LAST_EVENT_ID = re.compile(r"[0-9]{1,18}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")  # the engine's rule
MAX_JSON_DEPTH = 64
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e\t]*")


class BadJson(ValueError):
    """Not JSON, not UTF-8, or nested too deeply; the message says which."""


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and ID.fullmatch(value) is not None


def valid_last_event_id(value: str) -> bool:
    return LAST_EVENT_ID.fullmatch(value) is not None


def header_problem(headers: Mapping[str, str]) -> str | None:
    """Why these (forwardable, lower-case) request headers are refused, or None."""
    for name, value in headers.items():
        if _PRINTABLE_ASCII.fullmatch(value) is None:
            return f"the {name} header must be printable ASCII"
    last = headers.get("last-event-id")
    if last is not None and not valid_last_event_id(last.strip()):
        return "Last-Event-ID must be a non-negative integer (ASCII digits)"
    key = headers.get("idempotency-key")
    if key is not None and IDEMPOTENCY_KEY.fullmatch(key) is None:
        return "Idempotency-Key must be 1-200 printable ASCII characters, no spaces"
    return None


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Do objects and arrays in ``value`` nest deeper than ``limit`` (the top one is 1)?"""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def loads(data: str | bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses input nested deeper than ``limit`` with BadJson."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadJson(f"the JSON nests deeper than {limit} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # malformed, NaN, a number past int's limit
        raise BadJson(f"malformed JSON: {str(exc)[:200]}") from None
    if too_deep(value, limit):
        raise BadJson(f"the JSON nests deeper than {limit} levels")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
