"""Which web pages may open ``WS /ws/run-flow``: the ``Origin`` check before the upgrade.

Browsers let any page open a WebSocket to any address, credentials or not, and only tell
the server where the page came from (``Origin``). ``flowgate up`` runs the ambassador on
loopback with inbound auth ``none``, so without this check any page a developer happens
to open could run flows through it. Allowed: requests without ``Origin`` (not a browser:
apps, curl, websocket libraries), the ambassador's own origin (``Origin``'s host:port is
the ``Host`` header's), and the origins listed in ``websocket.allowed_origins``.
Everything else, ``Origin: null`` included, is refused with 403 before the upgrade.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalize(origin: str) -> str | None:
    """``scheme://host:port`` in lower case with the port spelled out, or None when
    ``origin`` is not a serialized origin (a path, a query, user info, ``null``...)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in DEFAULT_PORTS or not host or parts.username is not None \
            or parts.password is not None or parts.path not in ("", "/") or parts.query \
            or parts.fragment:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port or DEFAULT_PORTS[scheme]}"


def _host_port(normal_origin: str) -> str:
    return normal_origin.split("://", 1)[1]


def _host_header(host: str, scheme: str) -> str | None:
    """``Host`` as ``host:port`` (the port of ``scheme`` when it has none)."""
    try:
        parts = urlsplit("//" + host.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{name}:{port or DEFAULT_PORTS[scheme]}"


def refusal(environ: Mapping[str, Any], allowed: Iterable[str]) -> str | None:
    """Why this request's ``Origin`` may not open a WebSocket here, or None if it may."""
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return None
    normal = normalize(origin)
    if normal is not None:
        if normal in allowed:
            return None
        host = environ.get("HTTP_HOST")
        if host and _host_header(host, normal.split("://", 1)[0]) == _host_port(normal):
            return None
    shown = origin if len(origin) <= 100 and origin.isprintable() else repr(origin[:100])
    return (f"pages from {shown} may not open a WebSocket here: only the same origin and "
            "websocket.allowed_origins may")
