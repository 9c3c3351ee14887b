"""Malformed input meant to crash a handler or grow the engine's memory: JSON nested a
thousand deep, event ids that are digits only to ``str.isdigit``, flow ids with a trailing
newline, arbitrary HTTP methods and paths to mint metric series. Every one is a clear 4xx
(never a 500) and adds no label value the engine did not choose."""

from __future__ import annotations

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
