"""The drills' own arithmetic, without processes: counting LLM calls from llm-sim's bounded
request log, the verdict's classes, the version timeline and the stream checks. A drill that
passes because its tally is wrong would prove nothing."""

from __future__ import annotations

import json
from typing import Any

from support.chaos import Outcome, Timeline, check_stream, verdict
from support.llm_calls import LlmCalls


class FakeSim:
    """llm-sim's request log: the last ``keep`` requests, oldest first. ``marked``: each
    entry says whether its stream was cut off (``closed_early``), set in place by ``cut``."""

    def __init__(self, keep: int = 100, *, marked: bool = False) -> None:
        self.keep, self.marked = keep, marked
        self.log: list[dict[str, Any]] = []
        self.closed_early = 0

    def call(self, text: str, port: int = 1) -> dict[str, Any]:
        entry: dict[str, Any] = {"body": {"messages": [{"role": "user", "content": text}]},
                                 "remote_port": port}
        if self.marked:
            entry["closed_early"] = False
        self.log.append(entry)
        self.log = self.log[-self.keep:]
        return entry

    def cut(self, entry: dict[str, Any]) -> None:
        """The stream of this call was closed early (its engine died)."""
        self.closed_early += 1
        if self.marked:
            entry["closed_early"] = True

    def requests(self) -> list[dict[str, Any]]:
        return list(self.log)

    def reset(self) -> None:
        self.log = []

    def stats(self) -> dict[str, Any]:
        return {"streams_closed_early": self.closed_early}


def test_calls_are_counted_across_reads_of_a_log_that_keeps_the_last_100():
    sim = FakeSim()
    calls = LlmCalls(sim)  # type: ignore[arg-type]
    for i in range(250):
        sim.call(f"[v1] ask q0000abcdn{i}")
        if i % 60 == 59:
            calls.poll()
    sim.call("[v1] ask q0000abcdn7")  # one request reaches the LLM a second time
    calls.stop()
    assert calls.calls() == 251 and not calls.overflowed
    assert calls.repeated() == {"q0000abcdn7": 2}
    assert calls.duplicated() == 1
    sim.closed_early = 1  # ... the first call of it was cut off by a dying engine
    calls.stats = sim.stats()
    assert calls.duplicated() == 0  # an llm-sim without per-call marks: the drill's total


def test_a_cut_off_call_explains_a_repeat_of_its_own_request_only():
    sim = FakeSim(marked=True)
    calls = LlmCalls(sim)  # type: ignore[arg-type]
    sim.call("ask q0000abcdn1")
    sim.call("ask q0000abcdn1")  # run twice, both completed: a real duplicate
    calls.poll()
    sim.cut(sim.call("ask q0000abcdn2"))  # cut off by a dying engine ...
    sim.call("ask q0000abcdn2")  # ... and retried: not a duplicate
    cut_later = sim.call("ask q0000abcdn3")
    calls.poll()  # read before its mark came
    sim.cut(cut_later)
    sim.call("ask q0000abcdn3")
    sim.cut(sim.call("ask q0000abcdn4"))  # cut off, never retried: explains nothing
    calls.stop()
    assert calls.repeated() == {"q0000abcdn1": 2, "q0000abcdn2": 2, "q0000abcdn3": 2}
    assert calls.cut_off() == {"q0000abcdn2": 1, "q0000abcdn3": 1, "q0000abcdn4": 1}
    assert sim.stats()["streams_closed_early"] == 3  # more than the one duplicate ...
    assert calls.duplicated() == 1  # ... which an unrelated cut-off no longer hides
    assert calls.calls() == 7 and not calls.overflowed


def test_a_log_that_turned_over_between_two_reads_is_an_overflow():
    sim = FakeSim()
    calls = LlmCalls(sim)  # type: ignore[arg-type]
    for i in range(100):
        sim.call(f"ask q0000abcdn{i}")
    calls.poll()
    for i in range(100, 230):
        sim.call(f"ask q0000abcdn{i}")
    calls.poll()
    assert calls.overflowed


def outcome(seq: int, status: int | None, seconds: float = 0.2, kind: str = "run", **kw: Any) -> Outcome:
    o = Outcome(kind, f"t{seq}", 100.0, 100.0 + seconds, status, **kw)
    o.detail["seq"] = seq
    return o


def test_the_verdict_sorts_what_requests_got():
    v = verdict([
        outcome(0, 200),
        outcome(1, None, error="ReadTimeout"),  # lost
        outcome(2, 500, code="internal"),  # outside the contract
        outcome(3, 503, code="circuit_open"),  # the contract
        outcome(4, 504, seconds=30.0, code="timeout"),  # past the deadline
        outcome(5, 503, code="circuit_open"),  # after recovery: must have succeeded
        outcome(6, 502, error="not JSON: '<html>'"),  # a 502 outside the error contract
    ], None, recovered_from_seq=5)
    assert [o.detail["seq"] for o in v.lost] == [1]
    assert [o.detail["seq"] for o in v.bad_5xx] == [2, 6]
    assert [o.detail["seq"] for o in v.late] == [4]
    assert [o.detail["seq"] for o in v.failed_after_recovery] == [5, 6]
    assert len(v.problems()) == 4


def test_the_timeline_allows_what_served_while_a_run_was_under_way():
    t = Timeline(live=1, slack_s=0.5)
    t.record(10.0, 10.1, {"live_version": 2, "routing": None})
    t.record(20.0, 20.1, {"live_version": 2, "routing": {"canary": {"version": 3, "percent": 50}}})
    t.record(30.0, 30.1, {"live_version": 1, "routing": None})
    assert t.allowed(0, 5) == {1}
    assert t.allowed(9.9, 10.05) == {1, 2}
    assert t.allowed(10.7, 19) == {2}
    assert t.allowed(25, 26) == {2, 3}
    assert t.allowed(31, 40) == {1}


def events(*items: tuple[str | None, str, dict[str, Any]]) -> list[tuple[str | None, str, str]]:
    return [(i, e, json.dumps(d)) for i, e, d in items]


def test_stream_checks():
    ok = events(("1", "run_started", {"version": 2, "run_id": "r"}),
                ("2", "token", {"text": '[simulated reply] you said: "[v2] hi"'}),
                ("3", "run_finished", {"version": 2, "output": '[simulated reply] you said: "[v2] hi"'}))
    assert check_stream(ok)[0] is None
    gap = [ok[0], ok[2]]
    assert "contiguous" in check_stream(gap)[0]
    summary = [*ok[:2], (None, "run_finished", ok[2][2])]
    assert "missing" in check_stream(summary)[0]
    wrong = events(("1", "run_started", {"version": 1}),
                   ("2", "run_finished", {"version": 2, "output": ""}))
    assert "started on version 1" in check_stream(wrong)[0]
    text = '[simulated reply] you said: "[v2] x'
    label = events(("1", "token", {"text": text}), ("2", "run_finished", {"version": 3, "output": text}))
    assert "version 2's definition" in check_stream(label)[0]
    cut = ok[:2]
    assert "without run_finished" in check_stream(cut)[0]
