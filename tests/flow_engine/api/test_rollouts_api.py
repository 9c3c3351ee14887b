"""Guarded rollouts: the rollout controller (flow_engine/rollouts/controller.py) aborts,
steps and promotes guarded canaries and rolls guarded publishes back, from per-version
outcomes in the store's shared window — each action one audited compare-and-set.

The controller here runs on a clock the test moves (the app's own controller is off), with
outcomes recorded straight into the window at chosen times; runs through the API then show
that real runs land in that window, classified as the analysis counts them."""

from __future__ import annotations

import time

import pytest
from support.keys import KEYS, as_

from flow_engine.errors import Conflict
from flow_engine.rollouts.controller import RolloutController
from flow_engine.rollouts.outcomes import OutcomeRecorder, StoreWindow

GUARD = {"max_error_rate": 0.1, "max_latency_ratio": 2.0, "min_runs": 10, "window_s": 60}


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Rig:
    """An engine app with flow ``f`` (v1 live, v2 stored) and a controller on a test clock."""

    def __init__(self, app, defs) -> None:
        self.app, self.api = app, app.test_client()
        self.engine = app.extensions["flowgate"]
        self.clock = Clock()
        self.recorder = OutcomeRecorder(StoreWindow(self.engine.store), clock=self.clock)
        self.controller = RolloutController(self.engine.store, self.recorder, self.engine.metrics,
                                            interval_s=2, on_change=self.engine.flows.forget,
                                            check_builds=self.engine.flows.check_builds,
                                            clock=self.clock)
        assert self.api.post("/api/v1/flows", json=defs.echo(id="f"),
                             headers=as_("admin")).status_code == 201
        assert self.api.put("/api/v1/flows/f", json=defs.echo("V2 {question}", id="f"),
                            headers=as_("admin")).status_code == 201

    def route(self, body) -> dict:
        resp = self.api.put("/api/v1/flows/f/routing", json=body, headers=as_("publisher"))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        self.sync()
        return resp.get_json()

    def publish(self, body) -> dict:
        resp = self.api.post("/api/v1/flows/f/publish", json=body, headers=as_("publisher"))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        self.sync()
        return resp.get_json()

    def sync(self) -> None:
        """The engine stamps a rollout's start with the real time: outcomes recorded from
        here on fall in or after its slot."""
        self.clock.t = max(self.clock.t, time.time())

    def runs(self, version: int, ok: int = 0, failed: int = 0, seconds: float = 0.1) -> None:
        for i in range(ok + failed):
            self.recorder.record("f", version, i >= ok, seconds)

    def judge(self, advance: float = 2.0):
        self.clock.advance(advance)  # past the lease's half interval
        return self.controller.run_once()

    def flow(self) -> dict:
        return self.api.get("/api/v1/flows/f", headers=as_("runner")).get_json()

    def audit(self) -> list[dict]:
        return self.api.get("/api/v1/flows/f/audit", headers=as_("runner")).get_json()["entries"]

    def actions(self, metric, action: str) -> float:
        return metric("flowgate_engine_rollout_actions_total", flow="f", action=action)


@pytest.fixture
def rig(make_app, defs) -> Rig:
    return Rig(make_app(api_keys=KEYS), defs)


@pytest.fixture
def metric_of(rig):
    from prometheus_client.parser import text_string_to_metric_families

    def value(name: str, **labels: str) -> float:
        text = rig.api.get("/metrics").get_data(as_text=True)
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    return value


def test_a_failing_canary_is_aborted_with_its_figures(rig, metric_of):
    rig.route({"canary": {"version": 2, "percent": 10, "guard": GUARD}})
    rig.runs(1, ok=100)
    rig.runs(2, ok=6, failed=4)

    assert rig.judge() == [("f", "canary_aborted")]

    flow = rig.flow()
    assert (flow["live_version"], flow["routing"]) == (1, None)
    entry = rig.audit()[0]
    assert (entry["actor"], entry["action"], entry["from_version"]) == ("engine", "canary_aborted", 1)
    reason = entry["reason"]
    assert reason["breach"] == "error_rate"
    assert (reason["candidate"]["runs"], reason["candidate"]["failed"]) == (10, 4)
    assert reason["baseline"]["runs"] == 100 and reason["guard"]["max_error_rate"] == 0.1
    assert rig.actions(metric_of, "canary_aborted") == 1
    assert rig.judge() == []  # nothing guarded any more


def test_an_aborted_canary_keeps_the_sticky_key(rig):
    rig.route({"canary": {"version": 2, "percent": 10, "guard": GUARD}, "sticky_key": "session_id"})
    rig.runs(2, failed=10)
    rig.judge()
    assert rig.flow()["routing"] == {"sticky_key": "session_id"}


@pytest.mark.parametrize(("canary", "live", "why"), [
    pytest.param({"failed": 9}, {"ok": 10}, "fewer canary runs than min_runs", id="too-few"),
    pytest.param({"ok": 8, "failed": 2}, {"ok": 80, "failed": 20},
                 "failing no more than live does", id="as-bad-as-live"),
    pytest.param({"ok": 10, "seconds": 0.3}, {"ok": 10, "seconds": 0.2},
                 "p95 1.5 × live's: within 2 ×", id="latency-within-ratio"),
    pytest.param({"ok": 10, "seconds": 5.0}, {"ok": 9, "seconds": 0.1},
                 "live has too few runs to compare latency", id="latency-no-baseline"),
])
def test_a_canary_holds(rig, canary, live, why):
    rig.route({"canary": {"version": 2, "percent": 10, "guard": GUARD}})
    rig.runs(1, **live)
    rig.runs(2, **canary)
    assert rig.judge() == [], why
    assert rig.flow()["routing"]["canary"]["percent"] == 10


def test_a_slow_canary_is_aborted(rig):
    rig.route({"canary": {"version": 2, "percent": 10, "guard": GUARD}})
    rig.runs(1, ok=50, seconds=0.1)
    rig.runs(2, ok=10, seconds=5.0)
    assert rig.judge() == [("f", "canary_aborted")]
    reason = rig.audit()[0]["reason"]
    assert reason["breach"] == "latency"  # p95s read off buckets 1.2 × apart: within 20 %
    assert reason["candidate"]["p95_s"] == pytest.approx(5.0, rel=0.2)
    assert reason["baseline"]["p95_s"] == pytest.approx(0.1, rel=0.2)


def test_a_healthy_canary_walks_its_steps_then_is_promoted(rig, metric_of):
    rig.route({"canary": {"version": 2, "steps": [10, 50, 100], "step_after_s": 30,
                          "guard": {**GUARD, "min_runs": 5, "window_s": 600}}})
    assert rig.flow()["routing"]["canary"]["percent"] == 10  # the first step
    rig.runs(1, ok=50)
    rig.runs(2, ok=5)
    assert rig.judge(advance=10) == []  # healthy, but not yet step_after_s on this step
    assert rig.judge(advance=25) == [("f", "canary_step")]
    assert rig.flow()["routing"]["canary"]["percent"] == 50
    assert rig.judge(advance=10) == []  # the new step's clock started over
    assert rig.judge(advance=25) == [("f", "canary_step")]
    assert rig.flow()["routing"]["canary"]["percent"] == 100
    assert rig.judge(advance=31) == [("f", "canary_promoted")]

    flow = rig.flow()
    assert (flow["live_version"], flow["routing"]) == (2, None)
    assert [e["action"] for e in rig.audit()][:4] == [
        "canary_promoted", "canary_step", "canary_step", "routing"]
    promoted = rig.audit()[0]
    assert (promoted["actor"], promoted["from_version"], promoted["to_version"]) == ("engine", 1, 2)
    assert rig.actions(metric_of, "canary_step") == 2
    assert rig.actions(metric_of, "canary_promoted") == 1
    # the promotion is a live change like a publish: a rollback goes back to 1
    assert rig.api.post("/api/v1/flows/f/rollback", headers=as_("publisher")).get_json()[
        "live_version"] == 1


def test_a_canary_that_no_longer_builds_is_aborted_not_promoted(rig, defs, metric_of):
    """Version 3 became a canary on an engine that knew its node type (written straight to
    the store here); this engine cannot build it, so it does not go live."""
    broken = defs.echo(id="f")
    broken["nodes"][2]["type"] = "RetiredModel"
    rig.engine.store.add_version("f", broken, "f", "")
    rig.engine.store.set_routing("f", {"canary": {
        "version": 3, "percent": 100, "steps": [100], "step_after_s": 30,
        "guard": {**GUARD, "min_runs": 5}, "started_at": rig.clock(),
        "step_started_at": rig.clock()}})
    rig.runs(1, ok=50)
    rig.runs(3, ok=50)  # healthy: a promotion is due

    assert rig.judge(advance=31) == [("f", "canary_aborted")]

    flow = rig.flow()
    assert (flow["live_version"], flow["routing"]) == (1, None)
    entry = rig.audit()[0]
    assert (entry["actor"], entry["action"], entry["to_version"]) == ("engine", "canary_aborted", 1)
    assert entry["reason"]["breach"] == "build"
    assert "version 3 cannot go live" in entry["reason"]["error"]
    assert entry["reason"]["problems"][0]["path"] == "$.nodes[2].type"
    assert entry["reason"]["canary"]["runs"] == 50
    assert rig.actions(metric_of, "canary_promoted") == 0


def test_a_canary_does_not_step_without_enough_runs(rig):
    rig.route({"canary": {"version": 2, "steps": [10, 100], "step_after_s": 5, "guard": GUARD}})
    rig.runs(2, ok=9)
    assert rig.judge(advance=60) == []
    assert rig.flow()["routing"]["canary"]["percent"] == 10


def test_a_person_s_change_in_between_wins(rig):
    rig.route({"canary": {"version": 2, "percent": 10, "guard": GUARD}})
    rig.runs(2, failed=10)
    seen = rig.engine.store.get_flow("f")  # what the controller read ...
    rig.route({"canary": {"version": 2, "percent": 30}})  # ... before a person re-routed

    with pytest.raises(Conflict):
        rig.controller.judge(seen, rig.clock())
    assert rig.flow()["routing"]["canary"] == {"version": 2, "percent": 30}
    assert rig.audit()[0]["actor"] == "release-bot"


def test_outcomes_from_before_the_canary_do_not_count(rig):
    rig.clock.advance(-120)  # pinned test runs of version 2, two minutes before the canary
    rig.runs(2, failed=20)
    rig.clock.advance(120)
    rig.route({"canary": {"version": 2, "percent": 10, "guard": GUARD}})
    assert rig.judge() == []


def test_a_guarded_publish_that_fails_is_rolled_back(rig, metric_of):
    rig.clock.advance(-30)
    rig.runs(1, ok=100)  # version 1's figures before the publish
    rig.clock.advance(30)
    rig.publish({"version": 2, "guard": GUARD})
    rig.runs(2, ok=5, failed=5)

    assert rig.judge() == [("f", "auto_rollback")]
    flow = rig.flow()
    assert (flow["live_version"], flow["routing"]) == (1, None)
    entry = rig.audit()[0]
    assert (entry["actor"], entry["action"], entry["from_version"], entry["to_version"]) == (
        "engine", "auto_rollback", 2, 1)
    assert entry["reason"]["baseline"]["runs"] == 100
    assert rig.actions(metric_of, "auto_rollback") == 1


def test_a_healthy_guarded_publish_is_verified_after_its_window(rig):
    rig.publish({"version": 2, "guard": GUARD})
    rig.runs(2, ok=30)
    assert rig.judge(advance=30) == []
    assert rig.judge(advance=31) == [("f", "publish_verified")]
    flow = rig.flow()
    assert (flow["live_version"], flow["routing"]) == (2, None)
    assert rig.audit()[0]["action"] == "publish_verified"
    assert rig.audit()[0]["reason"]["new"]["runs"] == 30


def test_one_controller_judges_at_a_time(rig):
    rig.route({"canary": {"version": 2, "percent": 10, "guard": GUARD}})
    other = RolloutController(rig.engine.store, rig.recorder, rig.engine.metrics, interval_s=2,
                              on_change=rig.engine.flows.forget, clock=rig.clock)
    assert rig.judge() == []  # this one took the lease ...
    assert other.run_once() is None  # ... so the other sits this turn out
    rig.clock.advance(2)
    assert other.run_once() == []


def test_runs_through_the_api_are_counted_as_the_analysis_counts_them(make_app, defs):
    app = make_app(api_keys=KEYS)
    api, engine = app.test_client(), app.extensions["flowgate"]
    api.post("/api/v1/flows", json=defs.echo(id="e"), headers=as_("admin"))
    api.post("/api/v1/flows", json=defs.json_parser(id="j"), headers=as_("admin"))  # always fails
    for flow in ("e", "e", "j"):
        api.post(f"/api/v1/run/{flow}", json={"input_value": "hi"}, headers=as_("runner"))
    for flow in ("e", "j"):  # bad input: no outcome
        assert api.post(f"/api/v1/run/{flow}", json={"input_value": 7},
                        headers=as_("runner")).status_code == 400

    def counts(flow: str) -> tuple[int, int]:
        o = engine.runs.executor.outcomes.window(flow, 1, time.time() - 60, time.time())
        return o.ok, o.failed

    assert (counts("e"), counts("j")) == ((2, 0), (0, 1))
