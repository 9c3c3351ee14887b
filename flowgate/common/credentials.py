"""How a caller's credential is read from its request headers, written once: the
ambassador's auth filter (``ambassador/filters/auth.py``: API keys and JWTs) and the
engine's API-key check (``flow_engine/api/common.py``) both call these with the header
values (None when absent), so each service keeps its own header lookup."""

from __future__ import annotations

_BEARER = "bearer "  # the scheme is case-insensitive (RFC 9110 §11.1)


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (stripped), or None: no header,
    another scheme, or an empty token."""
    if authorization is None or authorization[:len(_BEARER)].lower() != _BEARER:
        return None
    return authorization[len(_BEARER):].strip() or None


def presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The API key a request presents: ``x-api-key: <key>`` when it is not blank, else
    ``Authorization: Bearer <key>``; None when neither holds one."""
    return (x_api_key or "").strip() or bearer_token(authorization)
