"""Malformed input meant to crash a handler or grow the engine's memory: JSON nested a
thousand deep, event ids that are digits only to ``str.isdigit``, flow ids with a trailing
newline, arbitrary HTTP methods and paths to mint metric series. Every one is a clear 4xx
(never a 500) and adds no label value the engine did not choose."""

from __future__ import annotations

import json
import random
import string
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.fake_ws import FakeSocket
from support.keys import as_

from flow_engine.api.ws import RunSocket


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deeply_nested_json_is_a_400(api, defs, depth):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    body = '{"input_value": "x", "tweaks": {"p": ' + nested(depth) + "}}"

    for path in ("/api/v1/run/f", "/api/v1/flows", "/api/v1/flows/validate"):
        resp = api.post(path, data=body, content_type="application/json", headers=as_("admin"))
        assert resp.status_code == 400, (path, resp.status_code)
        assert "nested deeper than 64" in resp.get_json()["error"]["message"]


def test_nesting_a_flow_needs_is_fine(api, defs):
    flow = defs.echo(id="f")
    flow["nodes"][0]["params"] = {}
    assert api.post("/api/v1/flows", json=flow, headers=as_("admin")).status_code == 201


def test_a_deeply_nested_websocket_message_is_refused(keyed_app):
    app = keyed_app()
    eng = app.extensions["flowgate"]
    ws = FakeSocket()
    handler = RunSocket(ws, eng.runs, eng.settings, eng.metrics)
    thread = threading.Thread(target=handler.serve, daemon=True)
    thread.start()
    ws.feed('{"type": "run", "flow_id": "f", "tweaks": ' + nested(5000) + "}")
    message = ws.next_message()
    assert (message["type"], message["code"]) == ("error", "bad_request")
    ws.disconnect()
    thread.join(5)


@pytest.mark.parametrize("value", ["²", "٣", "１", "-1", "1e3", " 1", "1 ", "0x1", "9" * 19])
@pytest.mark.parametrize("where", ["header", "query"])
def test_an_event_id_that_is_not_ascii_digits_is_a_400(api, value, where):
    headers = as_("runner")
    path = "/api/v1/runs/r1/events"
    if where == "header":
        headers = {**headers, "Last-Event-ID": value.encode().decode("latin-1")}
    else:
        path += f"?last_event_id={value}"

    resp = api.get(path, headers=headers)

    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("flow_id", ["abc\n", "abc\r\n", "\nabc", "a" * 65])
def test_flow_ids_match_in_full(api, defs, flow_id):
    resp = api.post("/api/v1/flows", json=defs.echo(id=flow_id), headers=as_("admin"))

    assert resp.status_code == 422
    assert resp.get_json()["error"]["problems"][0]["path"] == "$.id"


def _series(api) -> set[tuple]:
    text = api.get("/metrics").get_data(as_text=True)
    return {(s.name, tuple(sorted(s.labels.items())))
            for f in text_string_to_metric_families(text) for s in f.samples}


def _hostile_requests(api, rng: random.Random, n: int) -> None:
    for _ in range(n):
        method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
        path = "/" + "".join(rng.choices(string.ascii_lowercase + "/", k=rng.randint(1, 30)))
        resp = api.open(path, method=method, headers=as_("runner"))
        assert resp.status_code < 500
        flow = "".join(rng.choices(string.ascii_letters, k=12))
        api.post(f"/api/v1/run/{flow}", json={"input_value": "x"}, headers=as_("runner"))
        api.get(f"/api/v1/runs/{flow}", headers=as_("runner"))


def test_random_methods_paths_and_ids_add_no_series(api, defs):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    rng = random.Random(7)
    _hostile_requests(api, rng, 50)  # the bounded label values ("other", 404, ...) exist now
    _series(api)  # and GET /metrics' own
    before = _series(api)

    _hostile_requests(api, rng, 1000)

    added = _series(api) - before
    assert not added, sorted(added)[:10]


def test_an_unknown_method_is_labelled_other(api):
    api.open("/api/v1/flows", method="BREW", headers=as_("runner"))
    text = api.get("/metrics").get_data(as_text=True)
    assert 'method="other"' in text and "BREW" not in text


@pytest.mark.parametrize(("body", "fragment"), [
    pytest.param('{"input_value": "x", "session_id": "a\\u0000b"}', "NUL", id="nul-in-session"),
    pytest.param('{"input_value": "x\\u0000"}', "NUL", id="nul-in-input"),
    pytest.param('{"input_value": "x", "tweaks": {"p": {"\\u0000": 1}}}', "NUL", id="nul-in-a-key"),
    pytest.param('{"input_value": NaN}', "malformed JSON", id="nan"),
    pytest.param('{"input_value": "x", "version": Infinity}', "malformed JSON", id="infinity"),
    pytest.param('{"input_value": "x", "version": ' + "9" * 5000 + "}", "malformed JSON",
                 id="a-5000-digit-number"),
    pytest.param('{"input_value": "x", "input_type": {}}', "input_type", id="input-type-object"),
    pytest.param('{"input_value": "x", "output_type": 0}', "output_type", id="output-type-zero"),
    pytest.param('{"input_value": "x", "version": 1180591620717411303424}', "version",
                 id="version-past-any-column"),
])
def test_values_no_store_could_keep_are_a_400(api, defs, body, fragment):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))

    resp = api.post("/api/v1/run/f", data=body, content_type="application/json",
                    headers=as_("runner"))

    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert fragment in resp.get_json()["error"]["message"]


def test_a_nul_in_a_flow_name_is_a_400(api, defs):
    flow = json.dumps(defs.echo(id="f", name="name\x00"))
    resp = api.post("/api/v1/flows", data=flow, content_type="application/json",
                    headers=as_("admin"))
    assert resp.status_code == 400


def test_versions_past_any_column_are_not_found_or_refused(api, defs):
    api.post("/api/v1/flows", json=defs.echo(id="f"), headers=as_("admin"))
    huge = "9" * 25
    assert api.get(f"/api/v1/flows/f/versions/{huge}", headers=as_("runner")).status_code == 404
    resp = api.post("/api/v1/flows/f/publish", json={"version": int(huge)}, headers=as_("admin"))
    assert resp.status_code == 400


@pytest.mark.parametrize("run_id", [
    pytest.param("r1", id="too-short"),
    pytest.param("0" * 31 + "G", id="not-hex"),
    pytest.param("%00" + "0" * 31, id="nul"),
    pytest.param("%0d%0aSet-Cookie:x=1", id="crlf"),
    pytest.param("%C3%A9" * 16, id="non-ascii"),
    pytest.param("abc:owner", id="a-redis-key-suffix"),
])
@pytest.mark.parametrize("route", ["", "/events", "/cancel"])
def test_a_run_id_the_engine_could_not_have_made_is_404_at_once(api, run_id, route):
    method = "POST" if route == "/cancel" else "GET"
    resp = api.open(f"/api/v1/runs/{run_id}{route}", method=method, headers=as_("runner"))

    assert resp.status_code == 404, resp.get_data(as_text=True)
    assert resp.get_json()["error"]["code"] == "run_not_found"
    assert "X-Run-ID" not in resp.headers


@pytest.mark.parametrize(("host", "allowed", "status"), [
    pytest.param("localhost", "", 200, id="localhost"),
    pytest.param("127.0.0.1:8000", "", 200, id="loopback-ip"),
    pytest.param("[::1]:8000", "", 200, id="loopback-v6"),
    pytest.param("rebind.attacker.example:8000", "", 403, id="a-rebound-name"),
    pytest.param("flow-engine:8000", "flow-engine", 200, id="listed"),
])
def test_an_engine_without_keys_answers_loopback_host_names_only(make_app, host, allowed, status):
    """With --insecure-no-auth, a page whose DNS name was rebound to 127.0.0.1 is the
    browser's "same origin": only the Host header tells the engine it is not local."""
    client = make_app(api_keys="", insecure_no_auth=True, allowed_hosts=allowed).test_client()

    resp = client.get("/api/v1/flows", headers={"Host": host})

    assert resp.status_code == status, resp.get_data(as_text=True)
