"""Tweaks may change the params a flow declares ``tweakable`` per run, but never where an
LLM call (with the engine's key) is sent: ChatModel ``base_url`` and ``provider`` are
locked, declared or not."""

from __future__ import annotations

import pytest

from flow_engine.components import default_registry
from flow_engine.errors import FlowInvalid
from flow_engine.flows.validate import apply_tweaks

FLOW = {
    "id": "f",
    "nodes": [{"id": "in", "type": "ChatInput"},
              {"id": "llm", "type": "ChatModel", "params": {"provider": "openai"}},
              {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}],
    "tweakable": {"llm": ["temperature", "model"]},
}


@pytest.mark.parametrize("param", [
    pytest.param({"base_url": "https://attacker.example/v1"}, id="base_url"),
    pytest.param({"provider": "echo"}, id="provider"),
])
def test_locked_params_cannot_be_tweaked(param):
    with pytest.raises(FlowInvalid) as info:
        apply_tweaks(FLOW, {"llm": {**param, "temperature": 0.5}}, default_registry())
    [problem] = info.value.problems
    assert problem.path == f"$.tweaks.llm.{next(iter(param))}"
    assert "cannot be changed per run" in problem.message


def test_other_params_can_be_tweaked():
    merged = apply_tweaks(FLOW, {"llm": {"temperature": 0.5, "model": "m"}}, default_registry())
    assert merged["nodes"][1]["params"] == {"provider": "openai", "temperature": 0.5, "model": "m"}


def test_run_with_a_base_url_tweak_is_refused_over_http(tmp_path):
    from prometheus_client import CollectorRegistry

    from flow_engine.app import create_app
    from flow_engine.metrics import EngineMetrics

    app = create_app({"database_url": f"sqlite:///{tmp_path}/t.db", "api_keys": "k" * 16,
                      "maintenance_interval_s": 0}, metrics=EngineMetrics(CollectorRegistry()))
    client = app.test_client()
    auth = {"x-api-key": "k" * 16}
    assert client.post("/api/v1/flows", json=FLOW, headers=auth).status_code == 201
    answer = client.post("/api/v1/run/f", headers=auth, json={
        "input_value": "hi", "tweaks": {"llm": {"base_url": "http://127.0.0.1:1/v1"}}})
    assert answer.status_code == 422
    assert answer.get_json()["error"]["problems"][0]["path"] == "$.tweaks.llm.base_url"
