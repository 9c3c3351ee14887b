"""An editor (or anyone who can store a flow) aims a ChatModel's ``base_url`` somewhere else
to collect the engine's provider key, or to make the engine call an internal address. The
flow is refused when it is validated, and no request ever leaves for that origin: a
listening socket in the test sees nothing. Origins listed ``keyless:`` may be called, never
with the key; the key travels in clear only where an operator wrote it down."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from support.keys import as_

from flow_engine.config import ConfigError, Settings
from flow_engine.egress import ProviderOrigins, origin

PROVIDER_KEY = "sk-engine-provider-key-do-not-leak"


def chat_flow(flow_id: str, base_url: str | None) -> dict:
    params = {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}
    if base_url is not None:
        params["base_url"] = base_url
    return {"id": flow_id, "nodes": [{"id": "in", "type": "ChatInput"},
                                     {"id": "llm", "type": "ChatModel", "params": params},
                                     {"id": "out", "type": "ChatOutput"}],
            "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}]}


@pytest.fixture
def trap() -> Iterator[tuple[socket.socket, str]]:
    """A listening socket standing for the attacker's host: (socket, its base URL)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()


def nothing_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.mark.parametrize("path", ["/api/v1/flows", "/api/v1/flows/validate"])
def test_a_flow_aimed_at_another_origin_is_refused_and_nothing_is_sent(
        keyed_app, trap, fresh_llm_sim, path):
    sock, url = trap
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url,
                       openai_api_key=PROVIDER_KEY).test_client()

    resp = client.post(path, json=chat_flow("steal", url), headers=as_("admin"))

    assert resp.status_code == 422, resp.get_data(as_text=True)
    [problem] = resp.get_json()["error"]["problems"]
    assert problem["path"] == "$.nodes[1].params.base_url"
    assert "not an allowed provider origin" in problem["message"]
    assert "FLOW_ENGINE_PROVIDER_ORIGINS" in problem["message"]
    assert PROVIDER_KEY not in resp.get_data(as_text=True)
    assert nothing_connected(sock)


def test_a_new_version_aimed_elsewhere_is_refused_too(keyed_app, trap, fresh_llm_sim):
    sock, url = trap
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url,
                       openai_api_key=PROVIDER_KEY).test_client()
    assert client.post("/api/v1/flows", json=chat_flow("f", None), headers=as_("admin")).status_code == 201

    resp = client.put("/api/v1/flows/f", json=chat_flow("f", url), headers=as_("admin"))

    assert resp.status_code == 422
    assert client.get("/api/v1/flows/f/versions", headers=as_("admin")).get_json()["versions"][-1][
        "version"] == 1
    assert nothing_connected(sock)


def test_a_stored_flow_aimed_elsewhere_does_not_run(keyed_app, trap, fresh_llm_sim):
    """A version stored before the rule (or before the operator narrowed the list)."""
    sock, url = trap
    app = keyed_app(openai_base_url=fresh_llm_sim.base_url, openai_api_key=PROVIDER_KEY)
    store = app.extensions["flowgate"].store
    store.create_flow("old", "old", "", chat_flow("old", url))

    resp = app.test_client().post("/api/v1/run/old", json={"input_value": "hi"},
                                  headers=as_("runner"))

    assert resp.status_code == 422
    assert nothing_connected(sock)


@pytest.mark.parametrize("url", [
    pytest.param("http://127.0.0.1:1@evil.example/v1", id="userinfo-trick"),
    pytest.param("http://evil.example/v1", id="other-host"),
    pytest.param("https://{host}:{port}/v1", id="other-scheme"),
    pytest.param("http://{host}:1/v1", id="other-port"),
    pytest.param("http://[::1]:{port}/v1", id="other-spelling-of-loopback"),
    pytest.param("http://{host}:{port}/v1\t", id="a-tab-the-client-would-refuse"),
    pytest.param("http://{host}:{port}\n.evil.example/v1", id="a-newline"),
])
def test_near_misses_of_an_allowed_origin_are_refused(keyed_app, fresh_llm_sim, url):
    parts = urlsplit(fresh_llm_sim.base_url)
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url).test_client()
    flow = chat_flow("f", url.format(host=parts.hostname, port=parts.port))

    assert client.post("/api/v1/flows", json=flow, headers=as_("admin")).status_code == 422


def test_the_default_origin_gets_the_key(keyed_app, fresh_llm_sim):
    client = keyed_app(openai_base_url=fresh_llm_sim.base_url,
                       openai_api_key=PROVIDER_KEY).test_client()
    flow = chat_flow("f", fresh_llm_sim.base_url)
    assert client.post("/api/v1/flows", json=flow, headers=as_("admin")).status_code == 201

    assert client.post("/api/v1/run/f", json={"input_value": "hi"}, headers=as_("runner")).status_code == 200

    [seen] = fresh_llm_sim.requests()
    assert seen["headers"].get("Authorization") == f"Bearer {PROVIDER_KEY}"


def test_a_keyless_origin_is_called_without_the_key(keyed_app, fresh_llm_sim):
    llm = origin(fresh_llm_sim.base_url)
    client = keyed_app(openai_base_url="https://api.openai.com/v1", openai_api_key=PROVIDER_KEY,
                       provider_origins=f"keyless:{llm}").test_client()
    flow = chat_flow("own-llm", fresh_llm_sim.base_url)
    assert client.post("/api/v1/flows", json=flow, headers=as_("admin")).status_code == 201

    resp = client.post("/api/v1/run/own-llm", json={"input_value": "hi"}, headers=as_("runner"))

    assert resp.status_code == 200, resp.get_data(as_text=True)
    [seen] = fresh_llm_sim.requests()
    assert "Authorization" not in seen["headers"] and "authorization" not in seen["headers"]


def test_a_listed_origin_gets_the_key(keyed_app, fresh_llm_sim):
    client = keyed_app(openai_base_url="https://api.openai.com/v1", openai_api_key=PROVIDER_KEY,
                       provider_origins=origin(fresh_llm_sim.base_url)).test_client()
    assert client.post("/api/v1/flows", json=chat_flow("f", fresh_llm_sim.base_url),
                       headers=as_("admin")).status_code == 201

    assert client.post("/api/v1/run/f", json={"input_value": "hi"}, headers=as_("runner")).status_code == 200

    [seen] = fresh_llm_sim.requests()
    assert seen["headers"].get("Authorization") == f"Bearer {PROVIDER_KEY}"


@pytest.mark.parametrize(("base_url", "listed", "ok"), [
    pytest.param("http://vllm.internal:8000/v1", "", False, id="clear-text-key-refused"),
    pytest.param("http://vllm.internal:8000/v1", "http://vllm.internal:8000", True,
                 id="clear-text-key-written-down"),
    pytest.param("https://vllm.internal/v1", "", True, id="tls"),
    pytest.param("http://127.0.0.1:9100/v1", "", True, id="loopback"),
    pytest.param("http://localhost:9100/v1", "", True, id="localhost"),
])
def test_the_provider_key_in_clear_to_another_host_must_be_written_down(base_url, listed, ok):
    settings = Settings.load({"api_keys": "k" * 16, "openai_base_url": base_url,
                              "openai_api_key": PROVIDER_KEY, "provider_origins": listed},
                             environ={})
    if ok:
        assert origin(base_url) in settings.egress.keyed
        return
    with pytest.raises(ConfigError, match=re.escape("PROVIDER_ORIGINS=http://vllm.internal:8000")):
        settings.check()


def test_without_a_key_plain_http_anywhere_is_fine():
    policy = ProviderOrigins.from_settings("http://llm-sim:9100/v1", None)
    assert policy.keyed == {"http://llm-sim:9100"}


@pytest.mark.parametrize("entry", ["ftp://x", "not a url", "keyless:", "http://"])
def test_a_malformed_origin_setting_stops_the_engine(entry):
    settings = Settings.load({"api_keys": "k" * 16, "provider_origins": entry}, environ={})
    with pytest.raises(ConfigError, match="FLOW_ENGINE_PROVIDER_ORIGINS"):
        settings.check()
