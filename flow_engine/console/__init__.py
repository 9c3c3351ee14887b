"""The Flowgate console at ``/ui/``: static HTML, CSS and JavaScript modules (``static/``)
that talk to the engine's own API from the browser, with the caller's key.

No build step: the files are served as they are in the package. The pages hold no data, so
they need no key; every figure comes from ``/api/v1`` with the key the user typed (kept in
``sessionStorage``, sent as a header; WebSockets open with a one-time ticket,
flow_engine/ws_tickets.py). Assets live under ``/ui/assets/<digest>/``, the digest of every
file: they are cached for a year and a new engine version changes every URL at once (ES
modules import each other relatively, so no file names need rewriting). ``index.html`` is
answered for every other ``/ui/`` path (the console routes in the browser) and never cached.

Every answer carries a strict Content-Security-Policy (scripts and styles from this origin
only, no inline code, no framing): the JavaScript renders every name, param, output and
token as text (``static/dom.js``), and the policy stops what a mistake would let through.
"""

from __future__ import annotations

import hashlib
import mimetypes
from functools import cache
from pathlib import Path

from flask import Blueprint, Response, abort, redirect

STATIC = Path(__file__).parent / "static"
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
               ".txt": "text/plain", ".html": "text/html"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Opener-Policy": "same-origin"}

bp = Blueprint("console", __name__)


@cache
def assets() -> tuple[str, dict[str, bytes]]:
    """(digest of every asset, {name: bytes}): read once per process."""
    files = {p.name: p.read_bytes() for p in sorted(STATIC.iterdir())
             if p.is_file() and p.name != "index.html"}
    digest = hashlib.sha256()
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:16], files


@cache
def index_html() -> bytes:
    digest, _files = assets()
    return (STATIC / "index.html").read_bytes().replace(b"{{ASSETS}}", f"/ui/assets/{digest}".encode())


@bp.after_request
def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.get("/ui")
def root():
    return redirect("/ui/", 308)


@bp.get("/ui/")
@bp.get("/ui/<path:page>")
def page(page: str = ""):
    """The console's one page; the browser shows the route (flows, a flow, a run)."""
    return Response(index_html(), content_type="text/html; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})


@bp.get("/ui/assets/<digest>/<name>")
def asset(digest: str, name: str):
    current, files = assets()
    data = files.get(name)
    if data is None:
        abort(404)
    kind = ASSET_TYPES.get(Path(name).suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/"):
        kind += "; charset=utf-8"
    # an old digest (a page loaded before an upgrade) gets today's file, not kept for long
    cache_control = "public, max-age=31536000, immutable" if digest == current else "no-cache"
    return Response(data, content_type=kind, headers={"Cache-Control": cache_control})
