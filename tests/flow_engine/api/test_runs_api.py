"""``POST /api/v1/run/{flow}`` (JSON answers), run records and cancellation, on SQLite and
PostgreSQL. Streaming, idempotency and chat memory have modules of their own."""

from __future__ import annotations

import threading
import time

import pytest

from flow_engine.runs.request import RunRequest

RESULT_KEYS = {"run_id", "flow_id", "version", "session_id", "output", "outputs", "usage",
               "duration_ms"}


@pytest.mark.parametrize("ref", [pytest.param("faq", id="by-id"),
                                 pytest.param("FAQ answerer", id="by-name")])
def test_run_answers_with_the_result_in_langflow_shape(defs, create_flow, run_flow, ref):
    create_flow(defs.echo("Q: {question}", id="faq", name="FAQ answerer"))

    resp = run_flow(ref, {"input_value": "when do refunds arrive", "session_id": "s-1"})

    assert resp.status_code == 200
    body = resp.get_json()
    assert set(body) == RESULT_KEYS
    assert (body["flow_id"], body["version"], body["session_id"]) == ("faq", 1, "s-1")
    assert body["output"] == "[echo: not an LLM] Q: when do refunds arrive"
    assert resp.headers["X-Run-ID"] == body["run_id"]
    entry = body["outputs"][0]["outputs"][0]
    assert body["outputs"][0]["inputs"] == {"input_value": "when do refunds arrive"}
    assert entry["component_id"] == "out"
    assert entry["results"]["message"]["text"] == body["output"]
    assert entry["results"]["message"]["session_id"] == "s-1"
    assert body["usage"]["llm_calls"] == 1
    assert body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + body["usage"]["output_tokens"]
    assert body["duration_ms"] >= 0


def test_run_without_a_body_uses_an_empty_input(defs, create_flow, run_flow):
    create_flow(defs.echo("Q: {question}", id="f"))

    resp = run_flow("f")

    assert resp.status_code == 200
    assert resp.get_json()["output"] == "[echo: not an LLM] Q: "


def test_version_pin_runs_that_version(client, auth, defs, create_flow, run_flow):
    create_flow(defs.echo("V1 {question}", id="f"))
    client.put("/api/v1/flows/f", json=defs.echo("V2 {question}"), headers=auth)

    pinned = run_flow("f", {"input_value": "x", "version": 2}).get_json()
    live = run_flow("f", {"input_value": "x"}).get_json()

    assert (pinned["version"], pinned["output"]) == (2, "[echo: not an LLM] V2 x")
    assert (live["version"], live["output"]) == (1, "[echo: not an LLM] V1 x")


def test_pinning_a_missing_version_is_404(defs, create_flow, run_flow):
    create_flow(defs.echo(id="f"))

    resp = run_flow("f", {"input_value": "x", "version": 9})

    assert resp.status_code == 404


def test_tweaks_override_params_for_one_request(defs, create_flow, run_flow):
    create_flow(defs.echo("Q: {question}", id="f", tweakable={"p": ["template"]}))

    tweaked = run_flow("f", {"input_value": "x", "tweaks": {"p": {"template": "Tweaked {question}!"}}})
    plain = run_flow("f", {"input_value": "x"})

    assert tweaked.status_code == 200
    assert tweaked.get_json()["output"] == "[echo: not an LLM] Tweaked x!"
    assert plain.get_json()["output"] == "[echo: not an LLM] Q: x"


@pytest.mark.parametrize(("tweaks", "paths"), [
    pytest.param({"ghost": {"template": "x"}}, ["$.tweaks.ghost"], id="unknown-node"),
    pytest.param({"p": "Tweaked"}, ["$.tweaks.p"], id="node-tweak-not-an-object"),
    pytest.param({"llm": {"temperature": 9}}, ["$.tweaks.llm.temperature"], id="out-of-range"),
    pytest.param({"llm": {"api_key": "sk-1"}}, ["$.tweaks.llm.api_key"], id="secret-param"),
    pytest.param({"llm": {"tempreature": 0}}, ["$.tweaks.llm.tempreature"], id="unknown-param"),
    pytest.param({"llm": {"temperature": 9, "max_tokens": 0}},
                 ["$.tweaks.llm.temperature", "$.tweaks.llm.max_tokens"], id="two-params"),
    pytest.param({"llm": {"model": "gpt-4o"}}, ["$.tweaks.llm.model"], id="not-tweakable"),
    pytest.param({"in": {"x": 1}}, ["$.tweaks.in.x"], id="node-without-tweakables"),
])
def test_invalid_tweaks_are_422_with_paths(defs, create_flow, run_flow, tweaks, paths):
    create_flow(defs.echo(id="f", tweakable={"llm": ["temperature", "max_tokens"]}))

    resp = run_flow("f", {"input_value": "x", "tweaks": tweaks})

    assert resp.status_code == 422
    error = resp.get_json()["error"]
    assert error["code"] == "flow_invalid"
    assert [p["path"] for p in error["problems"]] == paths


@pytest.mark.parametrize(("body", "word"), [
    pytest.param(["hello"], "object", id="body-a-list"),
    pytest.param("hello", "object", id="body-a-string"),
    pytest.param({"input_value": 5}, "input_value", id="input-value-a-number"),
    pytest.param({"input_value": ["a"]}, "input_value", id="input-value-a-list"),
    pytest.param({"input_type": "image"}, "input_type", id="bad-input-type"),
    pytest.param({"output_type": "html"}, "output_type", id="bad-output-type"),
    pytest.param({"session_id": ""}, "session_id", id="empty-session-id"),
    pytest.param({"session_id": 7}, "session_id", id="session-id-a-number"),
    pytest.param({"session_id": "s" * 201}, "session_id", id="session-id-too-long"),
    # PostgreSQL text cannot hold NUL: it was a 503 "store unavailable", and in a batch of
    # claims it failed other callers' claims with it (flow_engine/runs/claims.py)
    pytest.param({"session_id": "a\u0000b"}, "NUL", id="session-id-with-nul"),
    pytest.param({"version": 0}, "version", id="version-zero"),
    pytest.param({"version": "1"}, "version", id="version-a-string"),
    pytest.param({"version": True}, "version", id="version-boolean"),
    pytest.param({"tweaks": ["p"]}, "tweaks", id="tweaks-a-list"),
])
def test_run_body_validation_is_400(defs, create_flow, run_flow, body, word):
    create_flow(defs.echo(id="f"))

    resp = run_flow("f", body)

    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["code"] == "bad_request"
    assert word in error["message"]


def test_running_an_unknown_flow_is_404(run_flow):
    resp = run_flow("nope", {"input_value": "x"})

    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "flow_not_found"


def test_run_record_of_a_succeeded_run(client, auth, defs, create_flow, run_flow):
    create_flow(defs.echo(id="f"))
    result = run_flow("f", {"input_value": "x", "session_id": "s-9"}).get_json()

    resp = client.get(f"/api/v1/runs/{result['run_id']}", headers=auth)

    assert resp.status_code == 200
    record = resp.get_json()
    assert (record["run_id"], record["flow_id"], record["version"]) == (result["run_id"], "f", 1)
    assert (record["status"], record["session_id"]) == ("succeeded", "s-9")
    assert record["output"] == result["output"]
    assert record["result"] == result
    assert record["finished_at"] is not None and record["duration_ms"] >= 0
    assert "error" not in record


def test_unknown_run_record_is_404(client, auth):
    resp = client.get("/api/v1/runs/no-such-run", headers=auth)

    assert resp.status_code == 404
    assert resp.get_json()["error"]["code"] == "run_not_found"


def test_a_failing_node_is_502_run_failed_and_the_record_says_failed(
        client, auth, defs, create_flow, run_flow):
    create_flow(defs.json_parser(id="j"))

    resp = run_flow("j", {"input_value": "this is not json"})
    # the streamed call names the run (X-Run-ID) before it fails
    streamed = run_flow("j", {"input_value": "this is not json"}, query="?stream=true")

    assert resp.status_code == 502
    error = resp.get_json()["error"]
    assert error["code"] == "run_failed"
    assert "parse" in error["message"] and "Traceback" not in error["message"]
    record = client.get(f"/api/v1/runs/{streamed.headers['X-Run-ID']}", headers=auth).get_json()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "run_failed"
    assert record["error"]["message"] == error["message"]
    assert "output" not in record and record["finished_at"] is not None


def test_a_failed_run_response_names_its_run(client, auth, defs, create_flow, run_flow):
    create_flow(defs.json_parser(id="j"))

    resp = run_flow("j", {"input_value": "this is not json"})

    assert resp.status_code == 502
    run_id = resp.headers.get("X-Run-ID") or resp.get_json()["error"].get("run_id")
    assert run_id, "the 502 does not say which run failed"
    assert client.get(f"/api/v1/runs/{run_id}", headers=auth).get_json()["status"] == "failed"


def test_cancel_a_finished_run_is_409_and_an_unknown_one_404(client, auth, defs, create_flow,
                                                             run_flow):
    create_flow(defs.echo(id="f"))
    run_id = run_flow("f", {"input_value": "x"}).get_json()["run_id"]

    finished = client.post(f"/api/v1/runs/{run_id}/cancel", headers=auth)
    unknown = client.post("/api/v1/runs/no-such-run/cancel", headers=auth)

    assert finished.status_code == 409
    assert finished.get_json()["error"]["code"] == "conflict"
    assert finished.get_json()["error"]["run_id"] == run_id
    assert client.get(f"/api/v1/runs/{run_id}", headers=auth).get_json()["status"] == "succeeded"
    assert unknown.status_code == 404
    assert unknown.get_json()["error"]["code"] == "run_not_found"


def test_cancel_a_running_run_stops_it(fresh_llm_sim, make_app, auth, defs, caller):
    """A slow simulated LLM keeps the run busy while the API cancels it."""
    fresh_llm_sim.configure(tokens_per_s=50, reply_tokens=500)  # ~10 s if never cancelled
    app = make_app(openai_base_url=fresh_llm_sim.base_url)
    client = app.test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="slow"), headers=auth).status_code == 201
    runs = app.extensions["flowgate"].runs
    prepared = runs.prepare("slow", RunRequest.from_body({"input_value": "hi"}), caller=caller,
                            idempotency_key=None, trace_id=None)
    outcome: dict[str, BaseException] = {}

    def work() -> None:
        try:
            runs.run(prepared)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while fresh_llm_sim.stats()["tokens_sent"] < 3:  # the LLM is streaming now
            assert worker.is_alive(), outcome
            assert time.monotonic() < deadline, "the simulated LLM never started streaming"
            time.sleep(0.01)
        running = client.get(f"/api/v1/runs/{prepared.run_id}", headers=auth).get_json()
        resp = client.post(f"/api/v1/runs/{prepared.run_id}/cancel", headers=auth)
    finally:
        worker.join(timeout=15)

    assert (running["run_id"], running["status"]) == (prepared.run_id, "running")
    assert resp.status_code == 202
    assert resp.get_json() == {"run_id": prepared.run_id, "status": "cancelling"}
    assert not worker.is_alive()
    assert getattr(outcome.get("error"), "code", None) == "run_cancelled"
    record = client.get(f"/api/v1/runs/{prepared.run_id}", headers=auth).get_json()
    assert record["status"] == "cancelled"
    assert record["error"]["code"] == "run_cancelled"


def test_a_flow_recreated_under_a_deleted_id_runs_its_new_definition(
        client, auth, defs, create_flow, run_flow):
    create_flow(defs.echo("OLD {question}", id="f"))
    assert run_flow("f", {"input_value": "x"}).get_json()["output"] == "[echo: not an LLM] OLD x"
    assert client.delete("/api/v1/flows/f", headers=auth).status_code == 204
    create_flow(defs.echo("NEW {question}", id="f"))

    resp = run_flow("f", {"input_value": "x"})

    assert resp.get_json()["output"] == "[echo: not an LLM] NEW x"


@pytest.mark.parametrize(("sim", "tweaks", "status", "code"), [
    pytest.param({"error_rate": 1.0, "error_kinds": ["500"]}, None, 502, "llm_error", id="llm-500"),
    pytest.param({"error_rate": 1.0, "error_kinds": ["429"]}, None, 502, "llm_error", id="llm-429"),
    pytest.param({"ttft_s": 2.0}, {"llm": {"timeout": 0.3}}, 504, "run_timeout", id="llm-timeout"),
])
def test_llm_failures_follow_the_error_contract(fresh_llm_sim, make_app, auth, defs, sim, tweaks,
                                                status, code):
    fresh_llm_sim.configure(**sim)
    client = make_app(openai_base_url=fresh_llm_sim.base_url).test_client()
    flow = defs.openai(id="llm", tweakable={"llm": ["timeout"]})
    assert client.post("/api/v1/flows", json=flow, headers=auth).status_code == 201

    resp = client.post("/api/v1/run/llm", json={"input_value": "hi", "tweaks": tweaks},
                       headers=auth)

    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert list(body) == ["error"]
    assert body["error"]["code"] == code
    assert "node 'llm'" in body["error"]["message"]
    assert "Traceback" not in resp.get_data(as_text=True)
    assert body["error"]["trace_id"] == resp.headers["X-Trace-ID"]


def test_model_aliases_send_the_endpoints_model_for_the_name_a_flow_uses(fresh_llm_sim, make_app,
                                                                         auth, defs):
    """FLOW_ENGINE_MODEL_ALIASES: the examples' gpt-4o-mini runs on a local server that
    serves another name; the flow itself is not changed."""
    client = make_app(openai_base_url=fresh_llm_sim.base_url,
                      model_aliases="gpt-4o-mini=llama3.1:8b").test_client()
    for flow_id, model in (("aliased", "gpt-4o-mini"), ("plain", "flowgate-sim")):
        flow = defs.openai(id=flow_id)
        flow["nodes"][1]["params"]["model"] = model
        assert client.post("/api/v1/flows", json=flow, headers=auth).status_code == 201
        resp = client.post(f"/api/v1/run/{flow_id}", json={"input_value": "hi"}, headers=auth)
        assert resp.status_code == 200, resp.get_data(as_text=True)
    assert [r["body"]["model"] for r in fresh_llm_sim.requests()] == ["llama3.1:8b", "flowgate-sim"]
    stored = client.get("/api/v1/flows/aliased", headers=auth).get_json()
    assert "llama3.1:8b" not in str(stored)  # what the flow says stays what it says
