"""``flowgate_engine_canary_percent{flow}``: each flow's configured canary percent, set from
every committed change (the store's ``on_audit`` → ``EngineMetrics.audited``) and, when an
engine process starts, for every known flow (the rollout controller's start)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from support.prom import label_values, metric_value

from flow_engine.metrics import EngineMetrics
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
