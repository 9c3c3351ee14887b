"""A small client of the engine's HTTP API, for the ``flowgate flows`` commands."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

DEFAULT_ENGINE_URL = "http://127.0.0.1:8000"
KEY_FILE = Path(".flowgate") / "engine.key"  # written by `flowgate up`


class ApiError(Exception):
    """The engine answered with an error (``status``, ``code``, ``problems``)."""

    def __init__(self, status: int, code: str, message: str, problems: list | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.problems = status, code, message, problems or []


class Unreachable(Exception):
    pass


def resolve_key(explicit: str | None) -> str | None:
    """--api-key, else FLOWGATE_API_KEY, else a secret from FLOW_ENGINE_API_KEYS (see
    :func:`engine_key_secret`), else the admin key `flowgate up` left in ./.flowgate/engine.key.

    Raises ``flow_engine.auth.KeyConfigError`` when FLOW_ENGINE_API_KEYS cannot be parsed."""
    if explicit:
        return explicit
    if os.environ.get("FLOWGATE_API_KEY", "").strip():
        return os.environ["FLOWGATE_API_KEY"].strip()
    entries = [e for e in os.environ.get("FLOW_ENGINE_API_KEYS", "").split(",") if e.strip()]
    if entries:
        return engine_key_secret(entries)
    if KEY_FILE.is_file():
        return KEY_FILE.read_text(encoding="utf-8").strip() or None
    return None


def engine_key_secret(entries: list[str]) -> str:
    """The secret to call the engine with, from its own key list (``name:role:secret``
    entries or bare secrets): the first key of the highest role — an admin key when there is
    one — since the CLI publishes and rolls back; never an entry verbatim, which would send
    ``name:role:`` as part of the key."""
    from flow_engine.auth import ROLES, parse_key  # pure: no Flask, no store

    keys = [parse_key(entry) for entry in entries]
    best = max(keys, key=lambda k: ROLES.index(k.role))  # max() keeps the first of equals
    return best.secret.decode()


class EngineClient:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 120.0,
                 message: str | None = None):
        """``message``: why — sent with every change (``X-Flowgate-Message``) for the
        audit log."""
        self.url = (url or os.environ.get("FLOWGATE_ENGINE_URL") or DEFAULT_ENGINE_URL).rstrip("/")
        self.session = requests.Session()
        self.timeout = timeout
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"
        if message:  # percent-encoded UTF-8: a header holds ASCII
            self.session.headers["X-Flowgate-Message"] = quote(message, safe=" ")

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        try:
            resp = self.session.request(method, f"{self.url}/api/v1{path}", json=body,
                                        timeout=self.timeout, **kwargs)
        except requests.ConnectionError as exc:
            raise Unreachable(f"cannot reach the engine at {self.url} ({type(exc).__name__}); "
                              "is it running? (flowgate up, or --engine-url)") from None
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
            except (ValueError, KeyError, TypeError):
                raise ApiError(resp.status_code, "http_error", resp.text[:300]) from None
            raise ApiError(resp.status_code, err.get("code", "error"), err.get("message", ""),
                           err.get("problems"))
        return resp.json() if resp.content else None

    def push(self, definition: dict[str, Any], publish: bool) -> tuple[str, int, bool]:
        """Create the flow, or add a version when it exists. Returns (id, version, created)."""
        flow_id = definition.get("id")
        if flow_id:
            try:
                self.call("GET", f"/flows/{flow_id}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
            else:
                version = self.call("PUT", f"/flows/{flow_id}", definition)["version"]
                if publish:
                    self.call("POST", f"/flows/{flow_id}/publish", {"version": version})
                return flow_id, version, False
        flow = self.call("POST", "/flows", definition)
        return flow["id"], 1, True

    def stream_run(self, flow_id: str, body: dict[str, Any]) -> Iterator[tuple[str, dict]]:
        try:
            resp = self.session.post(f"{self.url}/api/v1/run/{flow_id}?stream=true", json=body,
                                     stream=True, timeout=self.timeout)
        except requests.ConnectionError as exc:
            raise Unreachable(f"cannot reach the engine at {self.url} ({type(exc).__name__})") from None
        if resp.status_code >= 400:
            err = resp.json().get("error", {})
            raise ApiError(resp.status_code, err.get("code", "error"), err.get("message", ""),
                           err.get("problems"))
        event, data = None, []
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and event:
                yield event, json.loads("\n".join(data))
                event, data = None, []
