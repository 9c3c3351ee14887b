"""Where the engine may send LLM requests, and which of them carry the provider key.

The engine holds one provider key (``OPENAI_API_KEY``). A flow may name another endpoint in
a ``ChatModel``'s ``base_url``; without a rule, anyone able to store a flow could aim the
engine — and its key — at a host of their choosing, or at internal addresses. So:

- The key goes only to ``OPENAI_BASE_URL``'s origin and to the origins listed in
  ``FLOW_ENGINE_PROVIDER_ORIGINS`` (``https://api.openai.com,https://llm.internal``).
- An entry ``keyless:ORIGIN`` lets flows call ORIGIN *without* the key (a team's own Ollama).
- A flow whose ``base_url`` has any other origin is refused when it is validated (422, at
  ``$.nodes[i].params.base_url``), so no request ever leaves for it.
- Plain ``http://`` to a non-loopback host carries the key only when that origin is listed
  explicitly: ``OPENAI_BASE_URL=http://vllm.internal:8000/v1`` with ``OPENAI_API_KEY`` set
  stops the engine at start-up until the origin is also in ``FLOW_ENGINE_PROVIDER_ORIGINS``
  (so sending the key in clear is a decision someone wrote down).

An origin is ``scheme://host:port`` with the host lower-cased and the default port spelled
out, compared as a string: names are never resolved here, and redirects are never followed
by the provider client (``openai_compat``), so a listed origin cannot bounce a request on.
When not to use this: it is not an egress firewall for the whole process; put network
policy around the engine too (the k8s base ships one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_BASE_URL = "https://api.openai.com/v1"
KEYLESS = "keyless:"


class EgressError(ValueError):
    """An origin setting is malformed or unsafe; the message names the setting."""


def origin(url: str) -> str:
    """``scheme://host:port`` of an http(s) URL; ValueError when it has none."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        # urlsplit drops tabs and newlines the HTTP client would refuse: judge the URL as sent
        raise ValueError("a URL may not contain spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    if parts.username or parts.password:
        raise ValueError("credentials in the URL are not allowed")
    port = parts.port or (443 if scheme == "https" else 80)  # ValueError for a bad port
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def is_loopback(origin_: str) -> bool:
    host = urlsplit(origin_).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ProviderOrigins:
    keyed: frozenset[str]  # may receive the provider key
    keyless: frozenset[str] = frozenset()  # may be called, never with the key

    @classmethod
    def from_settings(cls, base_url: str | None, api_key: str | None,
                      entries: Iterable[str] = ()) -> ProviderOrigins:
        keyed: set[str] = set()
        keyless: set[str] = set()
        for entry in entries:
            raw = entry.strip()
            target = keyless if raw.startswith(KEYLESS) else keyed
            raw = raw.removeprefix(KEYLESS)
            try:
                target.add(origin(raw))
            except ValueError as exc:
                raise EgressError(f"FLOW_ENGINE_PROVIDER_ORIGINS: {raw[:200]!r}: {exc}; "
                                  "entries are origins like https://api.openai.com or "
                                  "keyless:http://ollama:11434") from None
        try:
            default = origin(base_url or DEFAULT_BASE_URL)
        except ValueError as exc:
            raise EgressError(f"OPENAI_BASE_URL: {exc}") from None
        if (api_key and default.startswith("http://") and not is_loopback(default)
                and default not in keyed):
            raise EgressError(
                f"OPENAI_BASE_URL is plain http to {default} and OPENAI_API_KEY is set: the key "
                "would travel in clear. Use https, or list the origin in "
                f"FLOW_ENGINE_PROVIDER_ORIGINS={default} to accept that.")
        keyed.add(default)
        return cls(frozenset(keyed), frozenset(keyless - keyed))

    def problem(self, base_url: str) -> str | None:
        """Why a flow may not call ``base_url`` (None: it may)."""
        try:
            target = origin(base_url)
        except ValueError as exc:
            return f"base_url {exc}"
        if target in self.keyed or target in self.keyless:
            return None
        allowed = ", ".join(sorted(self.keyed | self.keyless))
        return (f"base_url origin {target} is not an allowed provider origin (allowed: "
                f"{allowed}); the engine's operator can add it to FLOW_ENGINE_PROVIDER_ORIGINS")

    def key_for(self, base_url: str, api_key: str | None) -> str | None:
        """The key to send to ``base_url``: the provider key for keyed origins, else none."""
        try:
            return api_key if origin(base_url) in self.keyed else None
        except ValueError:
            return None

