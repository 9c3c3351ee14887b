"""diff_definitions: what changed between two stored versions of a flow."""

from __future__ import annotations

import copy

import pytest

from flow_engine.flows.diff import diff_definitions, is_empty

V1 = {
    "id": "faq", "name": "FAQ",
    "nodes": [{"id": "in", "type": "ChatInput"},
              {"id": "p", "type": "PromptTemplate", "params": {"template": "Q: {question}"}},
              {"id": "llm", "type": "ChatModel", "params": {"provider": "openai", "temperature": 0}},
              {"id": "out", "type": "ChatOutput"}],
    "edges": [{"source": "in", "target": "p"}, {"source": "p", "target": "llm"},
              {"source": "llm", "target": "out"}],
}


def changed(**edits) -> dict:
    flow = copy.deepcopy(V1)
    for fn in edits.values():
        fn(flow)
    return flow


def test_the_same_definition_has_an_empty_diff():
    diff = diff_definitions(V1, copy.deepcopy(V1))
    assert is_empty(diff)
    assert diff == {"fields": {}, "nodes": {"added": [], "removed": [], "changed": []},
                    "edges": {"added": [], "removed": []}}


@pytest.mark.parametrize(("edit", "path", "expected"), [
    pytest.param(lambda f: f["nodes"][2]["params"].update(temperature=0.7),
                 ("nodes", "changed"), [{"id": "llm", "params": {"temperature": {"from": 0, "to": 0.7}}}],
                 id="param-changed"),
    pytest.param(lambda f: f["nodes"][2]["params"].update(max_tokens=100),
                 ("nodes", "changed"), [{"id": "llm", "params": {"max_tokens": {"from": None, "to": 100}}}],
                 id="param-added"),
    pytest.param(lambda f: f["nodes"][2]["params"].pop("temperature"),
                 ("nodes", "changed"), [{"id": "llm", "params": {"temperature": {"from": 0, "to": None}}}],
                 id="param-removed"),
    pytest.param(lambda f: f["nodes"][1].update(type="ChatPromptTemplate"),
                 ("nodes", "changed"),
                 [{"id": "p", "type": {"from": "PromptTemplate", "to": "ChatPromptTemplate"}}],
                 id="type-changed"),
    pytest.param(lambda f: f["nodes"].append({"id": "extra", "type": "TextOutput"}),
                 ("nodes", "added"), [{"id": "extra", "type": "TextOutput", "params": {}}],
                 id="node-added"),
    pytest.param(lambda f: f["nodes"].pop(0), ("nodes", "removed"),
                 [{"id": "in", "type": "ChatInput", "params": {}}], id="node-removed"),
    pytest.param(lambda f: f["edges"].append({"source": "in", "target": "llm", "target_input": "x"}),
                 ("edges", "added"), [{"source": "in", "target": "llm", "target_input": "x"}],
                 id="edge-added"),
    pytest.param(lambda f: f["edges"].pop(), ("edges", "removed"),
                 [{"source": "llm", "target": "out"}], id="edge-removed"),
    pytest.param(lambda f: f.update(name="FAQ bot"), ("fields",),
                 {"name": {"from": "FAQ", "to": "FAQ bot"}}, id="name"),
    pytest.param(lambda f: f.update(tweakable={"llm": ["temperature"]}), ("fields",),
                 {"tweakable": {"from": None, "to": {"llm": ["temperature"]}}}, id="tweakable"),
])
def test_each_kind_of_change_is_reported_where_it_happened(edit, path, expected):
    diff = diff_definitions(V1, changed(e=edit))

    part = diff
    for key in path:
        part = part[key]
    assert part == expected
    assert not is_empty(diff)


def test_a_param_set_to_null_is_a_change():
    after = changed(e=lambda f: f["nodes"][2]["params"].update(temperature=None))
    diff = diff_definitions(V1, after)
    assert diff["nodes"]["changed"] == [{"id": "llm", "params": {"temperature": {"from": 0, "to": None}}}]
