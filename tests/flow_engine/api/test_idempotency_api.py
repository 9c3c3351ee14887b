"""``Idempotency-Key`` on ``POST /api/v1/run/{flow}``: the same key and body answer with the
first run (``Idempotent-Replayed: true``) instead of running the flow again; another body
with the same key is a 409; failed runs replay their error."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flask import Flask
from support.prom import metric_value
from support.waiting import wait_until

from flow_engine.runs.idempotency import scoped_key
from flow_engine.runs.request import RunRequest

BODY = {"input_value": "hello", "session_id": "s-1"}
RUNS = "flowgate_engine_runs_total"


def test_same_key_and_body_replay_the_first_run(defs, create_flow, run_flow, metric):
    create_flow(defs.echo(id="f"))
    key = {"Idempotency-Key": "order-42"}

    first = run_flow("f", BODY, headers=key)
    second = run_flow("f", BODY, headers=key)

    assert first.status_code == second.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.get_json() == first.get_json()
    assert second.headers["X-Run-ID"] == first.get_json()["run_id"]
    assert metric(RUNS, flow="f") == 1
    assert metric("flowgate_engine_idempotent_replays_total") == 1


def test_same_key_calls_the_llm_once_also_when_streamed(fresh_llm_sim, make_app, auth, defs,
                                                        sse_events, event_data):
    client = make_app(openai_base_url=fresh_llm_sim.base_url).test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=auth).status_code == 201
    headers = {**auth, "Idempotency-Key": "retry-me"}

    first = client.post("/api/v1/run/llm", json=BODY, headers=headers)
    again = client.post("/api/v1/run/llm", json=BODY, headers=headers)
    streamed = client.post("/api/v1/run/llm?stream=true", json=BODY, headers=headers)

    assert first.status_code == 200
    assert "simulated reply" in first.get_json()["output"]
    assert again.get_json() == first.get_json()
    assert streamed.headers["Idempotent-Replayed"] == "true"
    events = sse_events(streamed)  # the first run's own events, replayed from the log
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert (events[0].event, events[-1].event) == ("run_started", "run_finished")
    assert event_data(events[0])["run_id"] == first.get_json()["run_id"]
    assert event_data(events[-1]) == first.get_json()
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


@pytest.mark.parametrize(("flow", "body"), [
    pytest.param("f", {**BODY, "input_value": "hello!"}, id="other-input"),
    pytest.param("f", {**BODY, "session_id": "s-2"}, id="other-session"),
    pytest.param("f", {**BODY, "version": 1}, id="version-pinned"),
    pytest.param("f", {**BODY, "tweaks": {"p": {"template": "T {question}"}}}, id="with-tweaks"),
    pytest.param("g", BODY, id="other-flow"),
])
def test_same_key_with_another_request_is_409(defs, create_flow, run_flow, metric, flow, body):
    create_flow(defs.echo(id="f", tweakable={"p": ["template"]}))
    create_flow(defs.echo(id="g"))
    key = {"Idempotency-Key": "order-42"}
    assert run_flow("f", BODY, headers=key).status_code == 200

    resp = run_flow(flow, body, headers=key)

    assert resp.status_code == 409
    assert resp.get_json()["error"]["code"] == "conflict"
    assert metric(RUNS) == 1


@pytest.mark.parametrize("key", [
    pytest.param("has spaces", id="space"),
    pytest.param("tab\there", id="tab"),
    pytest.param("caf\u00e9", id="not-ascii"),
    pytest.param("", id="empty"),
    pytest.param("k" * 201, id="201-chars"),
    pytest.param("k" * 300, id="300-chars"),
])
def test_an_invalid_key_is_400_and_runs_nothing(defs, create_flow, run_flow, metric, key):
    create_flow(defs.echo(id="f"))

    resp = run_flow("f", BODY, headers={"Idempotency-Key": key})

    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["code"] == "bad_request"
    assert "Idempotency-Key" in error["message"]
    assert metric(RUNS) == 0


def test_the_longest_valid_key_works(defs, create_flow, run_flow):
    create_flow(defs.echo(id="f"))
    key = {"Idempotency-Key": "~" * 200}

    first = run_flow("f", BODY, headers=key)
    second = run_flow("f", BODY, headers=key)

    assert first.status_code == 200
    assert second.get_json()["run_id"] == first.get_json()["run_id"]


def test_a_key_past_its_retention_runs_again(make_app, auth, defs, metric):
    client = make_app(idempotency_ttl_s=0).test_client()  # every key is already old
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=auth).status_code == 201
    headers = {**auth, "Idempotency-Key": "old-key"}

    first = client.post("/api/v1/run/f", json=BODY, headers=headers)
    second = client.post("/api/v1/run/f", json=BODY, headers=headers)

    assert first.status_code == second.status_code == 200
    assert "Idempotent-Replayed" not in second.headers
    assert second.get_json()["run_id"] != first.get_json()["run_id"]
    runs = client.get("/metrics").get_data(as_text=True)
    assert 'flowgate_engine_runs_total{flow="f",status="succeeded",version="1"} 2.0' in runs


def test_a_failed_run_replays_the_same_error(defs, create_flow, run_flow, metric):
    create_flow(defs.json_parser(id="j"))
    key = {"Idempotency-Key": "will-fail"}
    body = {"input_value": "not json"}

    first = run_flow("j", body, headers=key)
    second = run_flow("j", body, headers=key)

    assert first.status_code == second.status_code == 502
    assert first.get_json()["error"]["code"] == second.get_json()["error"]["code"] == "run_failed"
    assert second.get_json()["error"]["message"] == first.get_json()["error"]["message"]
    assert metric(RUNS, flow="j", status="failed") == 1


def test_concurrent_identical_requests_run_once(fresh_llm_sim, make_app, auth, defs, caller):
    """Eight callers race with one key while the first run is still waiting for the LLM:
    one runs it, the others wait for its result."""
    fresh_llm_sim.configure(ttft_s=0.3)
    app = make_app(openai_base_url=fresh_llm_sim.base_url)
    client = app.test_client()
    assert client.post("/api/v1/flows", json=defs.openai(id="llm"), headers=auth).status_code == 201
    runs = app.extensions["flowgate"].runs
    barrier = threading.Barrier(8)
    answers: list[tuple[dict, bool]] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            barrier.wait()
            prepared = runs.prepare("llm", RunRequest.from_body(BODY), caller=caller,
                                    idempotency_key="race", trace_id=None)
            answers.append(runs.run(prepared))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert errors == []
    assert len(answers) == 8
    assert len({result["run_id"] for result, _ in answers}) == 1
    assert sorted(replayed for _, replayed in answers) == [False] + [True] * 7
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


# -- a keyed run whose engine stopped -------------------------------------------------------------


def _as_if_its_engine_died(app, run_id: str, silent_s: float) -> None:
    """Put a finished run back to "running", last marked alive ``silent_s`` ago: what a
    crashed or killed engine leaves behind."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from flow_engine.store.sql import runs

    store = app.extensions["flowgate"].store
    app.extensions["flowgate"].runs.executor.flush()  # its end is written (then undone here)
    with store.engine.begin() as conn:
        conn.execute(runs.update().where(runs.c.run_id == run_id).values(
            status="running", result=None, finished_at=None,
            heartbeat_at=datetime.now(UTC) - timedelta(seconds=silent_s)))
        assert conn.execute(sa.select(runs.c.status).where(runs.c.run_id == run_id)).scalar_one() == "running"


def test_a_retry_runs_again_when_the_keyed_run_was_abandoned(make_app, auth, defs, metric):
    app = make_app()
    client = app.test_client()
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=auth).status_code == 201
    headers = {**auth, "Idempotency-Key": "crashed"}
    first = client.post("/api/v1/run/f", json=BODY, headers=headers).get_json()["run_id"]
    _as_if_its_engine_died(app, first, silent_s=app.extensions["flowgate"].runs.idempotency.stale_after_s + 5)

    retry = client.post("/api/v1/run/f", json=BODY, headers=headers)

    assert retry.status_code == 200, retry.get_json()
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.get_json()["run_id"] != first
    old = client.get(f"/api/v1/runs/{first}", headers=auth).get_json()
    assert (old["status"], old["error"]["code"]) == ("failed", "run_abandoned")
    # the key now belongs to the new run: the next retry replays it
    again = client.post("/api/v1/run/f", json=BODY, headers=headers)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.get_json()["run_id"] == retry.get_json()["run_id"]


def test_a_duplicate_waiting_on_a_run_that_stops_beating_takes_it_over(make_app, auth, defs):
    app = make_app()
    client = app.test_client()
    runs = app.extensions["flowgate"].runs
    runs.idempotency.stale_after_s = 0.5
    assert client.post("/api/v1/flows", json=defs.echo(id="f"), headers=auth).status_code == 201
    headers = {**auth, "Idempotency-Key": "stops-beating"}
    first = client.post("/api/v1/run/f", json=BODY, headers=headers).get_json()["run_id"]
    _as_if_its_engine_died(app, first, silent_s=0.0)  # alive a moment ago: the retry waits

    retry = client.post("/api/v1/run/f", json=BODY, headers=headers)

    assert retry.status_code == 200, retry.get_json()
    assert "Idempotent-Replayed" not in retry.headers
    assert retry.get_json()["run_id"] != first


def _replays(app: Flask) -> float:
    """How many requests to this engine waited for (or replayed) an earlier keyed run."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return metric_value(text, "flowgate_engine_idempotent_replays_total")


def test_a_keyed_run_beating_in_another_engine_is_never_taken_over(fresh_llm_sim, make_app,
                                                                   auth, defs, caller):
    """Engine A runs a keyed request whose model is held; its heartbeats carry the run far
    past engine B's stale_after_s. A duplicate sent to B waits for A's run and replays it:
    the model is called once. (The beats are what keeps it: without them the record's
    heartbeat_at would be its claim's, older than stale_after_s when B judges it.)"""
    fresh_llm_sim.configure(hold=True)
    owner = make_app(openai_base_url=fresh_llm_sim.base_url)
    judge = make_app(openai_base_url=fresh_llm_sim.base_url)  # the same store: another worker
    owner.extensions["flowgate"].runs.executor.heartbeat_s = 0.05
    # 5 s: a heartbeat thread starved that long on a loaded machine is not what is tested
    stale_after_s = judge.extensions["flowgate"].runs.idempotency.stale_after_s = 5.0
    assert owner.test_client().post("/api/v1/flows", json=defs.openai(id="llm"),
                                    headers=auth).status_code == 201
    headers = {**auth, "Idempotency-Key": "slow-but-alive"}
    answers: dict[str, Any] = {}

    def send(name: str, app: Flask) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.__setitem__(
            name, app.test_client().post("/api/v1/run/llm", json=BODY, headers=headers)))
        thread.start()
        return thread

    first = send("first", owner)
    store = owner.extensions["flowgate"].store
    claim = wait_until(lambda: store.find_run_by_key(scoped_key(caller.tenant, "slow-but-alive")),
                       what="the first run's claim")
    wait_until(lambda: (store.get_run(claim.run_id).heartbeat_at - claim.created_at)
               .total_seconds() > stale_after_s, timeout_s=30,
               what="a heartbeat later than stale_after_s after the claim")
    duplicate = send("duplicate", judge)
    wait_until(lambda: _replays(judge) == 1, what="the duplicate waiting for the first run")
    fresh_llm_sim.configure(hold=False)
    first.join(30), duplicate.join(30)

    assert answers["duplicate"].status_code == answers["first"].status_code == 200
    assert answers["duplicate"].headers.get("Idempotent-Replayed") == "true"
    assert answers["duplicate"].get_json()["run_id"] == answers["first"].get_json()["run_id"]
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


def test_a_duplicate_on_the_engine_running_the_key_waits_however_silent_its_heartbeat(
        fresh_llm_sim, make_app, auth, defs):
    """The owner is this very process: its run is never judged by heartbeats (a pause of the
    whole process would delay the beat and the judge alike)."""
    fresh_llm_sim.configure(hold=True)
    app = make_app(openai_base_url=fresh_llm_sim.base_url)
    runs = app.extensions["flowgate"].runs
    runs.executor.heartbeat_s, runs.idempotency.stale_after_s = 3600.0, 0.0  # never beats
    assert app.test_client().post("/api/v1/flows", json=defs.openai(id="llm"),
                                  headers=auth).status_code == 201
    headers = {**auth, "Idempotency-Key": "here"}
    answers: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda name=name: answers.__setitem__(
        name, app.test_client().post("/api/v1/run/llm", json=BODY, headers=headers)))
        for name in ("first", "duplicate")]
    threads[0].start()
    wait_until(lambda: len(fresh_llm_sim.requests()) == 1, what="the first run at the model")
    threads[1].start()
    wait_until(lambda: _replays(app) == 1,
               what="the duplicate waiting for the first run")
    fresh_llm_sim.configure(hold=False)
    for thread in threads:
        thread.join(30)

    assert answers["duplicate"].headers.get("Idempotent-Replayed") == "true"
    assert answers["duplicate"].get_json()["run_id"] == answers["first"].get_json()["run_id"]
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


def test_a_finished_run_is_here_until_the_store_has_its_end(make_app, auth, defs,
                                                            monkeypatch):
    """No gap between leaving the active set and the store taking the run's end: at every
    step in between (a hook on each) the process says the run is its own, so a duplicate
    never judges a run of this very process by its heartbeat (a gap once let one abandon a
    run that was writing its end and call the model again)."""
    app = make_app()
    flowgate = app.extensions["flowgate"]
    runs, store = flowgate.runs, flowgate.store
    assert app.test_client().post("/api/v1/flows", json=defs.echo(id="f"),
                                  headers=auth).status_code == 201
    seen: list[tuple[str, bool]] = []

    def spy(step: str, method: Any, run_id_of: Any) -> Any:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            for run_id in run_id_of(*args, **kwargs):
                seen.append((step, runs._here(run_id)))
            return method(*args, **kwargs)
        return hooked

    limits = runs.executor.limits
    monkeypatch.setattr(limits, "release", spy("released", limits.release, lambda r: [r]))
    monkeypatch.setattr(store, "record_run_ends", spy(
        "writing", store.record_run_ends,
        lambda inserts, finishes, *a, **k: [*(r.run_id for r in inserts),
                                            *(f["run_id"] for f in finishes)]))

    answer = app.test_client().post("/api/v1/run/f", json=BODY,
                                    headers={**auth, "Idempotency-Key": "no-gap"})
    runs.executor.flush()

    assert answer.status_code == 200
    assert seen == [("released", True), ("writing", True)]
    assert not runs._here(answer.get_json()["run_id"])  # recorded: the store answers now


def test_a_run_whose_accounting_fails_is_still_recorded(make_app, auth, defs, monkeypatch,
                                                       caplog):
    """Metrics, outcomes and token counts after a run are never in the way of its record: a
    failure there is logged, the run is recorded and stops being this process's."""
    app = make_app()
    flowgate = app.extensions["flowgate"]
    runs = flowgate.runs
    assert app.test_client().post("/api/v1/flows", json=defs.echo(id="f"),
                                  headers=auth).status_code == 201

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("metrics backend gone")

    monkeypatch.setattr(runs.executor, "_account", broken)
    answer = app.test_client().post("/api/v1/run/f", json=BODY,
                                    headers={**auth, "Idempotency-Key": "accounting"})
    runs.executor.flush()

    assert answer.status_code == 200
    run_id = answer.get_json()["run_id"]
    assert flowgate.store.get_run(run_id).status == "succeeded"
    assert not runs._here(run_id)
    assert f"could not account for run {run_id}" in caplog.text


def test_server_timing_says_the_engines_time_and_the_claims_share(defs, create_flow, run_flow):
    create_flow(defs.echo(id="f"))

    plain = run_flow("f", BODY)
    keyed = run_flow("f", BODY, headers={"Idempotency-Key": "timing-1"})

    def durations(response) -> dict[str, float]:
        parts = [p.strip().split(";dur=") for p in response.headers["Server-Timing"].split(",")]
        return {name: float(ms) for name, ms in parts}

    assert set(durations(plain)) == {"app"} and durations(plain)["app"] > 0
    claimed = durations(keyed)
    assert set(claimed) == {"app", "idem"}
    assert 0 < claimed["idem"] < claimed["app"]  # the key's claim is part of the engine's time
