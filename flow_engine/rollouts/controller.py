"""The rollout controller: walks guarded canaries and watches guarded publishes, in one
engine process at a time (Argo Rollouts' and Flagger's controller, for flow versions).

Every process starts it; a pass that finds guarded flows first claims the job ``rollouts``
in the store (``claim_job``: the lease), so one process judges at a time and another takes over within a
pass or two when that one dies. A pass reads the flows whose routing carries a ``guard``
(``store.guarded_flows``), reads the live and the candidate version's outcomes over the
guard's window from every process (flow_engine/rollouts/outcomes.py), and acts on the
verdict of flow_engine/rollouts/analysis.py:

=========================  ==============================================================
verdict                    change (actor ``engine``; ``reason`` holds the figures)
=========================  ==============================================================
canary ``abort``           routing back to live only — audit ``canary_aborted``
canary ``step``            canary percent to the next step — audit ``canary_step``
canary ``promote``         the canary becomes live — audit ``canary_promoted`` (once it
                           builds, as a person's promotion must: else ``abort``)
publish ``rollback``       live back to the previous version — audit ``auto_rollback``
publish ``done``           the watch ends (``window_s`` passed clean) — ``publish_verified``
=========================  ==============================================================

Each change is a compare-and-set on the routing the verdict was made on: when a person
changed the flow in between, theirs stands and the controller judges again next pass. Then
every process is told (``flow_changed``), a metric counts the action and the audit entry is
logged. A promotion builds the canary's version first (``check_builds``: compile and build
every component with this engine's settings, as a publish does); a version that no longer
builds — a node type, knowledge base or provider origin gone since it became a canary — is
not promoted: the canary is aborted, ``reason.breach`` ``build`` with the problems. A flow
whose judging fails (the store, a bug) is logged with its id and judged again next pass; the
pass goes on with the other flows. A canary's window starts when it was set up
(``started_at``), so outcomes of the version from before it was a canary (pinned test runs)
count at most one slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flow_engine.errors import Conflict, FlowgateError, FlowInvalid, NotFound
from flow_engine.metrics import EngineMetrics, canary_percent
from flow_engine.rollouts.analysis import Guard, Verdict, judge_canary, judge_publish
from flow_engine.rollouts.outcomes import OutcomeRecorder
from flow_engine.store.base import Change, FlowRecord, StoreError

log = logging.getLogger(__name__)
JOB = "rollouts"
MAX_FLOWS_FROM_ZERO = 1000  # flows whose change series exist from the start (see start())
ACTIONS = ("canary_step", "canary_promoted", "canary_aborted", "auto_rollback",
           "publish_verified")


class RolloutController:
    def __init__(self, store: Any, outcomes: OutcomeRecorder, metrics: EngineMetrics, *,
                 interval_s: float, on_change: Callable[[FlowRecord], None],
                 check_builds: Callable[[FlowRecord, int], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.outcomes = outcomes
        self.metrics = metrics
        self.interval_s = interval_s
        self._on_change = on_change  # tell every process (FlowService.forget)
        # FlowService.check_builds: raises FlowInvalid when a version cannot go live
        self._check_builds = check_builds or (lambda flow, version: None)
        self._clock = clock
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._counted: set[str] = set()  # flows whose action series exist

    def run_once(self) -> list[tuple[str, str]] | None:
        """One pass if this process holds the lease: the ``(flow_id, action)`` taken, or
        None when another process judged recently."""
        now = self._clock()
        guarded = self.store.guarded_flows()  # a read: no lease taken while nothing is guarded
        if not guarded:
            return []
        if not self.store.claim_job(JOB, self.interval_s / 2, datetime.fromtimestamp(now, UTC)):
            return None
        done = []
        for flow in guarded:
            self._count_from_zero(flow.id)
            try:
                action = self.judge(flow, now)
            except Conflict:  # a person's change landed first; judged again next pass
                continue
            except NotFound:  # deleted meanwhile
                continue
            except StoreError as exc:  # the store every flow needs: the pass ends here
                self.metrics.rollout_errors.labels(flow.id).inc()
                log.warning("rollouts: judging flow %s failed (%s); the pass ends, every "
                            "flow is judged again next pass", flow.id, exc.code,
                            extra={"flow_id": flow.id})
                break
            except FlowgateError as exc:  # this flow's own trouble: the others are judged
                self.metrics.rollout_errors.labels(flow.id).inc()
                log.warning("rollouts: judging flow %s failed (%s); the other flows are "
                            "judged, it again next pass", flow.id, exc.code,
                            extra={"flow_id": flow.id})
                continue
            except Exception:  # a bug or an odd routing: one flow never stops the others
                self.metrics.rollout_errors.labels(flow.id).inc()
                log.exception("rollouts: judging flow %s failed; the other flows are judged, "
                              "it again next pass", flow.id, extra={"flow_id": flow.id})
                continue
            if action is not None:
                done.append((flow.id, action))
        return done

    def judge(self, flow: FlowRecord, now: float) -> str | None:
        routing = flow.routing or {}
        canary = routing.get("canary") or {}
        if canary.get("guard") and canary.get("percent", 0) > 0 and flow.live_version:
            return self._judge_canary(flow, routing, canary, now)
        watch = routing.get("watch")
        if watch and flow.live_version:
            return self._judge_publish(flow, routing, watch, now)
        return None

    def _judge_canary(self, flow: FlowRecord, routing: dict[str, Any], canary: dict[str, Any],
                      now: float) -> str | None:
        guard = Guard(**canary["guard"])
        since = max(now - guard.window_s, canary.get("started_at") or now - guard.window_s)
        mine = self.outcomes.window(flow.id, canary["version"], since, now)
        live = self.outcomes.window(flow.id, flow.live_version, since, now)
        steps = canary.get("steps") or [canary["percent"]]
        step_started = canary.get("step_started_at") or canary.get("started_at") or now
        verdict = judge_canary(mine, live, guard, steps, canary["percent"], now - step_started,
                               canary.get("step_after_s", float("inf")))
        if verdict.action == "hold":
            return None
        if verdict.action == "step" and not canary.get("steps"):
            return None  # a guarded canary without steps stays where a person put it
        if verdict.action == "promote":
            verdict = self._builds(flow, canary["version"], verdict)
        rest = {"sticky_key": routing["sticky_key"]} if routing.get("sticky_key") else None
        if verdict.action == "abort":
            self._apply(flow, verdict, "canary_aborted", routing, new_routing=rest)
        elif verdict.action == "promote":
            self._apply(flow, verdict, "canary_promoted", routing, new_routing=rest,
                        live=canary["version"])
        else:
            stepped = {**canary, "percent": verdict.percent, "step_started_at": now}
            self._apply(flow, verdict, "canary_step", routing,
                        new_routing={**routing, "canary": stepped})
        return _ACTION_OF[verdict.action]

    def _builds(self, flow: FlowRecord, version: int, verdict: Verdict) -> Verdict:
        """``verdict`` when ``version`` builds; else an abort whose reason says why."""
        try:
            self._check_builds(flow, version)
        except FlowInvalid as exc:
            return Verdict("abort", {"breach": "build", "error": exc.message,
                                     "problems": [p.as_dict() for p in exc.problems[:20]],
                                     **verdict.reason})
        return verdict

    def _judge_publish(self, flow: FlowRecord, routing: dict[str, Any], watch: dict[str, Any],
                       now: float) -> str | None:
        guard = Guard(**watch["guard"])
        started = watch["started_at"]
        new = self.outcomes.window(flow.id, flow.live_version, started, now)
        previous = self.outcomes.window(flow.id, watch["previous"], started - guard.window_s,
                                        started)
        verdict = judge_publish(new, previous, guard, now - started)
        if verdict.action == "hold":
            return None
        if verdict.action == "rollback":
            self._apply(flow, verdict, "auto_rollback", routing, rollback=True)
        else:
            rest = {k: v for k, v in routing.items() if k != "watch"}
            self._apply(flow, verdict, "publish_verified", routing,
                        new_routing=rest if any(rest.values()) else None)
        return _ACTION_OF[verdict.action]

    def _apply(self, flow: FlowRecord, verdict: Verdict, action: str, routing: dict[str, Any],
               *, new_routing: dict[str, Any] | None = None, live: int | None = None,
               rollback: bool = False) -> None:
        change = Change(actor="engine", action=action, reason=verdict.reason)
        if rollback:
            changed = self.store.rollback(flow.id, change, expect=routing)
        else:
            changed = self.store.set_routing(flow.id, new_routing, change, live=live,
                                             expect=routing)
        self.metrics.rollout_actions.labels(flow.id, action).inc()
        level = logging.WARNING if action in ("canary_aborted", "auto_rollback") else logging.INFO
        log.log(level, "rollout of flow %s: %s (live now %s)", flow.id, action,
                changed.live_version)
        self._on_change(changed)

    def _count_from_zero(self, flow_id: str) -> None:
        """Create the flow's action series at 0 the first time it is guarded, so the first
        abort is an increase Prometheus sees (a series born at 1 shows none)."""
        if flow_id not in self._counted:
            self._counted.add(flow_id)
            for action in ACTIONS:
                self.metrics.rollout_actions.labels(flow_id, action)

    # -- in the background ------------------------------------------------------------------

    def start(self) -> None:
        """Judge every ``interval_s`` (0: never). First, in every process, each known flow's
        ``flowgate_engine_flow_changes_total`` series are made at 0 — Grafana annotates and
        alerts on their ``increase()``, which a series born at 1 (the first change after
        this process started) would not show — and its canary percent is set."""
        self.count_changes_from_zero()
        if self._thread is None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._forever, name="flowgate-rollouts",
                                            daemon=True)
            self._thread.start()

    def count_changes_from_zero(self) -> None:
        try:
            flows = self.store.list_flows(limit=MAX_FLOWS_FROM_ZERO)
        except FlowgateError as exc:  # a store down at start: the series come with changes
            log.warning("rollouts: the flows' change series were not made (%s)", exc.code)
            return
        for flow in flows:
            self.metrics.flow_changes.start(flow.id)
            self.metrics.canary_percent.labels(flow.id).set(canary_percent(flow.routing))

    def stop(self) -> None:
        self._stopped.set()

    def _forever(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.run_once()
            except FlowgateError as exc:
                log.warning("rollouts: pass failed (%s); next try in %g s", exc.code,
                            self.interval_s)
            except Exception:
                log.exception("rollouts: pass failed")


_ACTION_OF = {"abort": "canary_aborted", "promote": "canary_promoted", "step": "canary_step",
              "rollback": "auto_rollback", "done": "publish_verified"}
