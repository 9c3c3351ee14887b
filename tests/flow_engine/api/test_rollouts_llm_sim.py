"""Guarded canaries on their own, in real time, against a real llm-sim: the engine's own
rollout controller (every 0.5 s) aborts a canary whose model fails — the simulator's error
rate is raised for the canary's model only — and walks a healthy canary to 100 %."""

from __future__ import annotations

import time

import pytest
from support.keys import KEYS, as_

pytestmark = pytest.mark.integration


def openai_flow(model: str) -> dict:
    return {"id": "f", "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "llm", "type": "ChatModel",
         "params": {"provider": "openai", "model": model, "max_retries": 0}},
        {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}]}


@pytest.fixture
def api(make_app, fresh_llm_sim):
    app = make_app(api_keys=KEYS, openai_base_url=fresh_llm_sim.base_url,
                   rollout_interval_s=0.5, outcome_flush_s=0.2)
    api = app.test_client()
    assert api.post("/api/v1/flows", json=openai_flow("flowgate-sim"),
                    headers=as_("admin")).status_code == 201
    assert api.put("/api/v1/flows/f", json=openai_flow("canary-model"),
                   headers=as_("admin")).status_code == 201
    return api


def drive(api, until, deadline_s: float) -> tuple[float, dict[int, int]]:
    """Run the flow until ``until(flow)`` holds (checked after every run); the seconds it
    took and the answers by version. Fails after ``deadline_s``."""
    started, by_version = time.monotonic(), {}
    while time.monotonic() - started < deadline_s:
        resp = api.post("/api/v1/run/f", json={"input_value": "hi"}, headers=as_("runner"))
        version = int(resp.headers["X-Flow-Version"])  # failed answers say it too
        by_version[version] = by_version.get(version, 0) + 1
        flow = api.get("/api/v1/flows/f", headers=as_("runner")).get_json()
        if until(flow):
            return time.monotonic() - started, by_version
    pytest.fail(f"not reached within {deadline_s} s; answers by version {by_version}")


def test_a_canary_whose_model_fails_is_aborted_within_its_window(api, fresh_llm_sim):
    fresh_llm_sim.configure(model_error_rates={"canary-model": 0.5}, error_kinds=["500"])
    window_s = 10
    resp = api.put("/api/v1/flows/f/routing", headers=as_("publisher"), json={"canary": {
        "version": 2, "percent": 50,
        # latency off (100x): a failed run's retries can make it the slowest, and were the
        # first judged runs to hold a single failure, the latency guard would breach first
        "guard": {"max_error_rate": 0.1, "max_latency_ratio": 100, "min_runs": 10,
                  "window_s": window_s}}})
    assert resp.status_code == 200

    took, _ = drive(api, lambda flow: flow["routing"] is None, deadline_s=window_s + 5)

    entry = api.get("/api/v1/flows/f/audit", headers=as_("runner")).get_json()["entries"][0]
    assert (entry["actor"], entry["action"]) == ("engine", "canary_aborted")
    assert entry["reason"]["breach"] == "error_rate"
    assert entry["reason"]["candidate"]["error_rate"] > 0.1
    assert entry["reason"]["baseline"]["failed"] == 0  # live's model never failed
    assert took <= window_s + 5
    # after the abort every run is answered by live — once this process has dropped the
    # routing it cached (the controller commits the abort, then tells every process): a run
    # in between may still reach the canary, so wait for the first answer by live
    deadline = time.monotonic() + 5
    while True:
        resp = api.post("/api/v1/run/f", json={"input_value": "hi"}, headers=as_("runner"))
        if resp.headers["X-Flow-Version"] == "1" or time.monotonic() > deadline:
            break
    for _ in range(5):
        resp = api.post("/api/v1/run/f", json={"input_value": "hi"}, headers=as_("runner"))
        assert (resp.status_code, resp.headers["X-Flow-Version"]) == (200, "1")


def test_a_healthy_canary_walks_its_steps_to_live(api):
    resp = api.put("/api/v1/flows/f/routing", headers=as_("publisher"), json={"canary": {
        "version": 2, "steps": [20, 60, 100], "step_after_s": 1,
        # a healthy canary by errors; latency off (100x): on a loaded machine one slow run
        # among v2's first few is its p95 and tripped the default 2x (a CI flake)
        "guard": {"max_error_rate": 0.1, "max_latency_ratio": 100, "min_runs": 5,
                  "window_s": 30}}})
    assert resp.status_code == 200

    _, by_version = drive(api, lambda flow: flow["live_version"] == 2, deadline_s=40)

    actions = [e["action"] for e in api.get("/api/v1/flows/f/audit",
                                            headers=as_("runner")).get_json()["entries"]]
    assert actions[:3] == ["canary_promoted", "canary_step", "canary_step"]
    assert set(by_version) == {1, 2}
    assert api.get("/api/v1/flows/f", headers=as_("runner")).get_json()["routing"] is None
