"""A caller sends a ConditionalRouter pattern that makes a backtracking regex engine take
exponential time — ``(a|a)+$`` against ``"a" * n + "b"`` doubles its work with each ``a``
(22 of them took 1.3 s with Python's ``re``; 5,000 would outlast the universe) — to freeze
the worker and everyone on it. Patterns run on RE2, in time linear in the input, so these
requests simply answer (with Python's ``re`` they would hang until the test times out)."""

from __future__ import annotations

import pytest
from support.keys import as_

from flow_engine.components.routers import MAX_CHARS

EVIL_INPUTS = [
    pytest.param("(a|a)+$", "a" * 5000 + "b", id="ambiguous-alternation"),
    pytest.param("(a+)+$", "a" * 5000 + "!", id="nested-plus"),
    pytest.param(r"^(\w+\s?)+$", "word " * 2000 + "!", id="nested-words"),
    pytest.param("(x+x+)+y", "x" * 5000, id="overlapping"),
]


def router_flow(pattern: str) -> dict:
    """in → router(regex) → yes | no, its pattern tweakable."""
    return {
        "id": "router",
        "nodes": [
            {"id": "in", "type": "ChatInput"},
            {"id": "route", "type": "ConditionalRouter",
             "params": {"operator": "regex", "pattern": pattern, "max_chars": MAX_CHARS}},
            {"id": "yes", "type": "TextOutput"}, {"id": "no", "type": "TextOutput"}],
        "edges": [{"source": "in", "target": "route"},
                  {"source": "route", "target": "yes", "source_output": "true"},
                  {"source": "route", "target": "no", "source_output": "false"}],
        "tweakable": {"route": ["pattern"]},
    }


@pytest.mark.parametrize(("pattern", "text"), EVIL_INPUTS)
def test_a_catastrophic_pattern_in_a_tweak_answers_at_once(api, pattern, text):
    assert api.post("/api/v1/flows", json=router_flow("refund"), headers=as_("admin")).status_code == 201

    resp = api.post("/api/v1/run/router", headers=as_("runner"), json={
        "input_value": text, "output_type": "text", "tweaks": {"route": {"pattern": pattern}}})

    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["outputs"][0]["outputs"][0]["component_id"] == "no"
    # and the worker serves the next request as usual
    assert api.post("/api/v1/run/router", headers=as_("runner"), json={
        "input_value": "I want a refund", "output_type": "text"}).get_json()["outputs"][0][
            "outputs"][0]["component_id"] == "yes"


@pytest.mark.parametrize(("pattern", "text"), EVIL_INPUTS)
def test_a_catastrophic_pattern_in_a_definition_answers_at_once(api, pattern, text):
    flow = router_flow("x")
    flow["nodes"][1]["params"]["pattern"] = pattern
    assert api.post("/api/v1/flows", json=flow, headers=as_("admin")).status_code == 201

    resp = api.post("/api/v1/run/router", headers=as_("runner"),
                    json={"input_value": text, "output_type": "text"})

    assert resp.status_code == 200


@pytest.mark.parametrize(("pattern", "case_sensitive"), [
    pytest.param("(?:" + "[a-z]" * 95 + "){1000}", True, id="huge-counted-repetition"),
    pytest.param("(?:[Ā-ɏ][ɐ-ʯ][Ͱ-Ͽ][Ⴀ-ჿ]){300}", False, id="large-only-case-insensitively"),
])
def test_a_pattern_too_costly_to_run_is_refused_at_validation(api, pattern, case_sensitive):
    flow = router_flow("x")
    flow["nodes"][1]["params"].update(pattern=pattern, case_sensitive=case_sensitive)

    resp = api.post("/api/v1/flows", json=flow, headers=as_("admin"))

    assert resp.status_code == 422, resp.get_data(as_text=True)
    [problem] = resp.get_json()["error"]["problems"]
    assert problem["path"] == "$.nodes[1].params.pattern"
    assert "RE2" in problem["message"]
