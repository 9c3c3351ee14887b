"""``flowgate_engine_canary_percent{flow}``: each flow's configured canary percent, set from
every committed change (the store's ``on_audit`` → ``EngineMetrics.audited``) and, when an
engine process starts, for every known flow (the rollout controller's start)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.prom import label_values, metric_value

from flow_engine.metrics import FLOW_CHANGE_ACTIONS, EngineMetrics
from flow_engine.rollouts.controller import RolloutController
from flow_engine.rollouts.outcomes import OutcomeRecorder, StoreWindow
from flow_engine.store.base import Change

DEFINITION = {"id": "rag", "nodes": [{"id": "in", "type": "ChatInput"}], "edges": []}
GAUGE = "flowgate_engine_canary_percent"


def percent(metrics: EngineMetrics, flow_id: str) -> float | None:
    text = generate_latest(metrics.registry).decode()
    if flow_id not in label_values(text, GAUGE, "flow"):
        return None
    return metric_value(text, GAUGE, flow=flow_id)


def test_every_change_sets_the_flow_s_canary_percent(open_store):
    metrics = EngineMetrics(CollectorRegistry())
    store = open_store(on_audit=metrics.audited)
    store.migrate()
    store.create_flow("rag", "rag", "", DEFINITION)
    store.add_version("rag", {"v": 2}, "rag", "")
    assert percent(metrics, "rag") == 0

    store.set_routing("rag", {"canary": {"version": 2, "percent": 10}})
    assert percent(metrics, "rag") == 10
    store.set_routing("rag", {"canary": {"version": 2, "percent": 50}},
                      Change(actor="engine", action="canary_step"))
    assert percent(metrics, "rag") == 50
    store.add_version("rag", {"v": 3}, "rag", "")  # a new version leaves the routing be
    assert percent(metrics, "rag") == 50
    store.publish("rag", 3)
    assert percent(metrics, "rag") == 0
    store.set_routing("rag", {"canary": {"version": 2, "percent": 25}})
    store.rollback("rag")
    assert percent(metrics, "rag") == 0


def test_a_starting_process_sets_every_known_flow_s_percent(store):
    store.create_flow("rag", "rag", "", DEFINITION)
    store.add_version("rag", {"v": 2}, "rag", "")
    store.set_routing("rag", {"canary": {"version": 2, "percent": 30}})
    store.create_flow("chat", "chat", "", {**DEFINITION, "id": "chat"})

    metrics = EngineMetrics(CollectorRegistry())  # a new process
    controller = RolloutController(store, OutcomeRecorder(StoreWindow(store)), metrics,
                                   interval_s=0, on_change=lambda flow: None)
    controller.start()

    assert (percent(metrics, "rag"), percent(metrics, "chat")) == (30, 0)


def test_a_deleted_flow_leaves_its_counts_but_not_its_placeholders(open_store):
    """Created and deleted over and over, flows must not pile up series: a delete drops the
    flow's zero placeholders and its gauge; the changes it counted stay."""
    metrics = EngineMetrics(CollectorRegistry())
    store = open_store(on_audit=metrics.audited)
    store.migrate()
    for _ in range(3):
        store.create_flow("rag", "rag", "", DEFINITION)
        store.delete_flow("rag")

    text = generate_latest(metrics.registry).decode()
    assert "rag" not in label_values(text, GAUGE, "flow")
    changes = "flowgate_engine_flow_changes_total"
    assert sorted(label_values(text, changes, "action")) == ["create", "delete"]
    assert metric_value(text, changes, flow="rag", action="create") == 3
    assert metric_value(text, changes, flow="rag", action="delete") == 3


def test_past_its_bound_a_counter_makes_no_more_placeholders():
    metrics = EngineMetrics(CollectorRegistry())
    metrics.flow_changes.max_keys = 2
    for flow in ("a", "b", "c"):
        metrics.flow_changes.labels(flow, "publish").inc()

    text = generate_latest(metrics.registry).decode()
    series = [s.labels for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "flowgate_engine_flow_changes_total"]
    by_flow = {flow: sorted(s["action"] for s in series if s["flow"] == flow) for flow in "abc"}
    assert by_flow["a"] == by_flow["b"] == sorted(FLOW_CHANGE_ACTIONS)
    assert by_flow["c"] == ["publish"]  # born when used, as any counter's


def test_in_multiprocess_mode_a_deleted_flow_says_no_canary(open_store, monkeypatch, tmp_path):
    """prometheus_client cannot remove a series there: the gauge is set to 0 instead, and
    the placeholders stay (no warning per series)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = EngineMetrics(CollectorRegistry())
    store = open_store(on_audit=metrics.audited)
    store.migrate()
    store.create_flow("rag", "rag", "", DEFINITION)
    store.add_version("rag", {"v": 2}, "rag", "")
    store.set_routing("rag", {"canary": {"version": 2, "percent": 20}})

    store.delete_flow("rag")

    assert percent(metrics, "rag") == 0
