"""Without inbound auth, answer only requests addressed to this host (DNS rebinding).

With ``inbound_auth.mode: none`` the sidecar trusts whoever reaches it — the app beside it
on loopback. A web page open in a browser on the same machine reaches it too, if the page's
DNS name is re-pointed at 127.0.0.1 after it loads ("DNS rebinding"): the browser then
thinks the sidecar is the page's own origin (``Origin`` equals ``Host``), so neither the
browser nor an ``Origin`` check stops it from running flows or reading ``/readyz``. The one
thing such a request cannot fake is the ``Host`` it was sent to: the page's name. So while
inbound auth is off, requests whose ``Host`` is not a loopback name (``localhost``,
``127.0.0.1``, ``[::1]``) or listed in ``allowed_hosts`` are answered 403 — except the probes
and ``/metrics`` (the kubelet and Prometheus call them by the pod's IP), which hold nothing
a caller could use. With inbound auth on, credentials decide, and nothing here applies.

When not to use it: never needed in front of an authenticated sidecar; list the names your
app calls the sidecar by (e.g. a compose service name) in ``allowed_hosts``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

LOOPBACK = frozenset({"localhost", "127.0.0.1", "[::1]"})
EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})


def host_name(host: str) -> str:
    """The name part of a ``Host`` header, lower case (``[::1]:8080`` → ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if ":" in host else host


def local_host(host: str | None, allowed: Iterable[str] = ()) -> bool:
    name = host_name(host or "")
    return name in LOOPBACK or name in {a.lower() for a in allowed}


class HostGuard:
    """WSGI middleware: ``settings()`` gives the config in force (it may be reloaded)."""

    def __init__(self, app: Any, settings: Callable[[], Any]) -> None:
        self.app, self.settings = app, settings

    def __call__(self, environ: dict[str, Any], start_response):
        settings = self.settings()
        if (settings.inbound_auth.mode == "none" and environ.get("PATH_INFO") not in EXEMPT
                and not local_host(environ.get("HTTP_HOST"), settings.allowed_hosts)):
            body = json.dumps({"error": {
                "code": "forbidden", "trace_id": None,
                "message": "this sidecar has no inbound auth and answers requests to localhost "
                           "only; list the host name in allowed_hosts, or turn inbound auth on"}
            }).encode()
            start_response("403 Forbidden", [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(body)))])
            return [body]
        return self.app(environ, start_response)
