"""The rollout controller's pass (flow_engine/rollouts/controller.py ``run_once``) over
several guarded flows: one flow whose judging fails is logged with its id, counted, and
judged again next pass. Any other error of one flow leaves the pass to judge the others;
the store failing under it ends the pass (every flow needs the store: judging on would
only stretch the pass past its lease, one wait per flow). A real store (SQLite), outcomes
in its shared window, a test clock."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from flow_engine.metrics import EngineMetrics
from flow_engine.rollouts.controller import RolloutController
from flow_engine.rollouts.outcomes import OutcomeRecorder, StoreWindow
from flow_engine.store import SqlFlowStore
from flow_engine.store.base import StoreError

GUARD = {"max_error_rate": 0.1, "max_latency_ratio": 2.0, "min_runs": 5, "window_s": 60}
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def definition(flow_id: str) -> dict:
    return {"id": flow_id, "nodes": [{"id": "in", "type": "ChatInput"}], "edges": []}


@pytest.fixture
def store(tmp_path):
    store = SqlFlowStore(f"sqlite:///{tmp_path / 'flows.db'}")
    store.migrate()
    yield store
    store.close()


def healthy_canary_at_100(store: SqlFlowStore, recorder: OutcomeRecorder, flow_id: str) -> None:
    """Flow ``flow_id``: v1 live, v2 a guarded canary on its last step, healthy, due to be
    promoted at the next pass."""
    store.create_flow(flow_id, f"{flow_id} flow", "", definition(flow_id))
    store.add_version(flow_id, {"v": 2}, f"{flow_id} flow", "")
    store.set_routing(flow_id, {"canary": {"version": 2, "percent": 100, "guard": GUARD,
                                           "steps": [100], "step_after_s": 0,
                                           "started_at": T0}})
    for version in (1, 2):
        for _ in range(10):
            recorder.record(flow_id, version, False, 0.1)


@pytest.mark.parametrize("failure", ["store_error_building", "bug_reading_outcomes"])
def test_a_flow_whose_judging_fails_does_not_stop_the_pass(store, monkeypatch, caplog, failure):
    clock = Clock()
    recorder = OutcomeRecorder(StoreWindow(store), clock=clock)
    builds: list[tuple[str, int]] = []

    def check_builds(flow, version: int) -> None:
        builds.append((flow.id, version))
        if failure == "store_error_building" and flow.id == "a":
            raise StoreError("the flow store is unavailable; retry shortly")

    metrics = EngineMetrics(CollectorRegistry())
    controller = RolloutController(store, recorder, metrics,
                                   interval_s=2, on_change=lambda flow: None,
                                   check_builds=check_builds, clock=clock)
    healthy_canary_at_100(store, recorder, "a")  # judged first (flows in id order)
    healthy_canary_at_100(store, recorder, "b")
    if failure == "bug_reading_outcomes":
        real_window = recorder.window

        def window(flow_id, *args, **kwargs):
            if flow_id == "a":
                raise RuntimeError("a bug")
            return real_window(flow_id, *args, **kwargs)

        monkeypatch.setattr(recorder, "window", window)
    clock.t += 5

    store_down = failure == "store_error_building"
    with caplog.at_level(logging.WARNING, logger="flow_engine.rollouts.controller"):
        assert controller.run_once() == ([] if store_down else [("b", "canary_promoted")])

    assert (store.get_flow("a").live_version,
            store.get_flow("b").live_version) == (1, 1 if store_down else 2)
    assert store.get_flow("a").routing["canary"]["version"] == 2  # untouched
    failed = [r for r in caplog.records if "judging flow a failed" in r.getMessage()]
    assert len(failed) == 1 and getattr(failed[0], "flow_id", None) == "a"
    assert (failed[0].exc_info is not None) == (failure == "bug_reading_outcomes")
    errors = metrics.registry.get_sample_value
    assert errors("flowgate_engine_rollout_errors_total", {"flow": "a"}) == 1
    assert errors("flowgate_engine_rollout_errors_total", {"flow": "b"}) is None

    monkeypatch.undo()  # the failure passes: the flow is judged at the next pass
    if failure == "store_error_building":
        controller._check_builds = lambda flow, version: None
    clock.t += 5
    assert controller.run_once() == ([("a", "canary_promoted"), ("b", "canary_promoted")]
                                     if store_down else [("a", "canary_promoted")])
    assert store.get_flow("a").live_version == store.get_flow("b").live_version == 2
