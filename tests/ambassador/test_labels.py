"""ambassador.labels: a caller's flow id becomes a metric label value only when the config
names it or the engine ran it; everything else is ``other``, and the ids learned from the
engine are capped."""

from __future__ import annotations

import uuid

import pytest

from ambassador.labels import OTHER, FlowLabels

API_KEYS = [{"key": "app-secret-1", "identity": "a", "flows": ["allowed-flow"]},
            {"key": "app-secret-2", "identity": "b"}]


@pytest.fixture
def labels(settings_with) -> FlowLabels:
    labels = FlowLabels(limit=3)
    labels.configure(settings_with({"flows": {"cached-flow": {"cache": {"ttl_s": 1}}},
                                    "inbound_auth.mode": "api_keys",
                                    "inbound_auth.api_keys": API_KEYS}))
    return labels


@pytest.mark.parametrize(("flow_id", "label"), [
    pytest.param("cached-flow", "cached-flow", id="named-in-flows"),
    pytest.param("allowed-flow", "allowed-flow", id="named-in-an-allowlist"),
    pytest.param("random-" + uuid.uuid4().hex, OTHER, id="unknown"),
    pytest.param(None, "", id="no-flow"),
    pytest.param("", "", id="empty"),
])
def test_label_of(labels, flow_id, label) -> None:
    assert labels.of(flow_id) == label


def test_a_flow_the_engine_ran_becomes_a_label(labels) -> None:
    assert labels.of("ran-once") == OTHER
    labels.succeeded("ran-once")
    assert labels.of("ran-once") == "ran-once"


def test_learned_flows_are_capped(labels) -> None:
    for n in range(10):
        labels.succeeded(f"flow-{n}")
    assert [labels.of(f"flow-{n}") for n in range(5)] == ["flow-0", "flow-1", "flow-2", OTHER, OTHER]
    labels.succeeded("cached-flow")  # named ones take no room
    assert labels.of("cached-flow") == "cached-flow"


def test_a_reload_keeps_learned_flows_and_names_new_ones(labels, settings_with) -> None:
    labels.succeeded("ran-once")
    labels.configure(settings_with({"flows": {"new-flow": {"cache": {"ttl_s": 1}}}}))
    assert (labels.of("ran-once"), labels.of("new-flow"), labels.of("cached-flow")) == (
        "ran-once", "new-flow", OTHER)
