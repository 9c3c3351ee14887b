"""JSON text that is always valid UTF-8, and text the database can store.

``"caf\\ud800"`` is valid JSON, and decodes to a Python string holding a lone surrogate:
half of a UTF-16 pair, not a character, which UTF-8 cannot encode. Such strings reach run
inputs and outputs (a client's JSON, an LLM's JSON stream). Encoded with
``ensure_ascii=False`` (compact, what streams use) they made ``.encode()`` raise mid-stream,
and bound to a text column they made the driver raise. Here:

- :func:`dumps` writes non-ASCII characters as themselves, except in a value that holds a
  lone surrogate: then the whole text is written ASCII-only, the surrogate as the JSON
  escape ``\\ud800`` — the same JSON value, and valid UTF-8. (``surrogatepass`` would write
  bytes that are not UTF-8.) The check costs nothing for ASCII text and one encode
  otherwise, which SSE needs anyway.
- :func:`scrub` replaces lone surrogates with U+FFFD for text columns (a session id, a chat
  message): the database stores characters, not JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str).encode
_LONE = re.compile("[\ud800-\udfff]")  # in a str, a surrogate is always a lone one


def dumps(value: Any) -> str:
    """Compact JSON that :func:`encodable` holds for (see the module docstring)."""
    text = _compact(value)
    return text if encodable(text) else _ascii(value)


def dumps_utf8(value: Any) -> bytes:
    """:func:`dumps` as UTF-8 bytes (one encode in the usual case)."""
    text = _compact(value)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _ascii(value).encode()


def encodable(text: str) -> bool:
    """Can ``text`` be encoded as UTF-8 (no lone surrogate)?"""
    return text.isascii() or _LONE.search(text) is None


def scrub(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD."""
    return text if encodable(text) else _LONE.sub("\ufffd", text)
