"""ambassador.origin: which pages may open WS /ws/run-flow — a page on another origin (the
attack on a loopback ambassador with inbound auth none) is refused; non-browser clients,
the same origin and configured origins are not."""

from __future__ import annotations

import pytest

from ambassador.origin import normalize, refusal

ALLOWED = [normalize("https://app.example.com"), normalize("http://localhost:3000")]


@pytest.mark.parametrize(("origin", "host", "allowed"), [
    pytest.param(None, "127.0.0.1:8080", True, id="no-origin-not-a-browser"),
    pytest.param("http://127.0.0.1:8080", "127.0.0.1:8080", True, id="same-origin"),
    pytest.param("http://LOCALHOST:8080", "localhost:8080", True, id="same-origin-any-case"),
    pytest.param("http://[::1]:8080", "[::1]:8080", True, id="same-origin-ipv6"),
    pytest.param("https://sidecar.internal", "sidecar.internal", True,
                 id="same-origin-default-port"),
    pytest.param("https://sidecar.internal:443", "sidecar.internal", True,
                 id="same-origin-explicit-default-port"),
    pytest.param("https://app.example.com", "127.0.0.1:8080", True, id="configured-origin"),
    pytest.param("https://APP.example.com:443", "127.0.0.1:8080", True,
                 id="configured-origin-normalized"),
    pytest.param("http://localhost:3000", "localhost:8080", True, id="configured-dev-server"),
    pytest.param("https://evil.example", "127.0.0.1:8080", False, id="another-site"),
    pytest.param("http://127.0.0.1:3000", "127.0.0.1:8080", False, id="same-host-other-port"),
    pytest.param("http://app.example.com", "127.0.0.1:8080", False,
                 id="configured-host-other-scheme"),
    pytest.param("https://app.example.com.evil.example", "127.0.0.1:8080", False,
                 id="configured-origin-as-a-prefix"),
    pytest.param("null", "127.0.0.1:8080", False, id="null-origin-sandboxed-page"),
    pytest.param("file://", "127.0.0.1:8080", False, id="file-page"),
    pytest.param("http://127.0.0.1:8080/path", "127.0.0.1:8080", False, id="origin-with-a-path"),
    pytest.param("http://user@127.0.0.1:8080", "127.0.0.1:8080", False, id="origin-with-userinfo"),
    pytest.param("http://127.0.0.1:99999", "127.0.0.1:8080", False, id="origin-bad-port"),
    pytest.param("", "127.0.0.1:8080", False, id="empty-origin"),
    pytest.param("https://evil.example", None, False, id="no-host-header"),
    pytest.param("http://127.0.0.1:8080", "127.0.0.1:bad", False, id="bad-host-header"),
])
def test_refusal(origin, host, allowed) -> None:
    environ = {k: v for k, v in (("HTTP_ORIGIN", origin), ("HTTP_HOST", host)) if v is not None}
    reason = refusal(environ, ALLOWED)
    if allowed:
        assert reason is None
    else:
        assert reason is not None and "allowed_origins" in reason


@pytest.mark.parametrize(("origin", "normal"), [
    pytest.param("https://App.Example.com", "https://app.example.com:443", id="lower-case-port"),
    pytest.param("http://localhost:3000/", "http://localhost:3000", id="trailing-slash"),
    pytest.param("http://[::1]", "http://[::1]:80", id="ipv6"),
    pytest.param("ftp://files.example.com", None, id="other-scheme"),
    pytest.param("https://app.example.com?x=1", None, id="query"),
    pytest.param("app.example.com", None, id="no-scheme"),
])
def test_normalize(origin, normal) -> None:
    assert normalize(origin) == normal


def test_a_refused_origin_is_shown_safely() -> None:
    reason = refusal({"HTTP_ORIGIN": "https://evil\x00" + "x" * 500, "HTTP_HOST": "h"}, [])
    assert reason is not None and "\x00" not in reason and len(reason) < 300
