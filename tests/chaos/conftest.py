"""Fixtures of the chaos drills: a deployment per drill (tests/support/chaos.py), the session's
llm-sim with zeroed counters, and a summary of every drill's numbers at the end of the run.

Each drill needs ``redis-server`` (a private one, killed at will) and the shared PostgreSQL
(a schema of its own); without them it is skipped locally and fails under CI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.chaos import LlmCalls, Sim, Stack, Verdict, missing_tools
from support.needs import missing

_RESULTS: list[tuple[str, float, dict[str, Any]]] = []


class Chaos:
    """What a drill works with: ``sim``, ``stack(...)`` and ``report(...)``."""

    def __init__(self, tmp_path: Path, sim: Sim, nodeid: str) -> None:
        self.tmp_path, self.sim, self.nodeid = tmp_path, sim, nodeid
        self.stacks: list[Stack] = []
        self.started = time.monotonic()
        self.numbers: dict[str, Any] = {}

    def stack(self, **kwargs: Any) -> Stack:
        workdir = self.tmp_path / f"stack-{len(self.stacks)}"
        workdir.mkdir()
        stack = Stack(workdir, self.sim, **kwargs)
        self.stacks.append(stack)
        return stack.start()

    def calls(self) -> LlmCalls:
        """Count llm-sim's calls per request from now on (zeroes its counters)."""
        return LlmCalls(self.sim).start()

    def report(self, v: Verdict, **extra: Any) -> list[str]:
        """Record the drill's numbers for the summary; the problems to assert on, with the
        processes' log tails when there are any."""
        self.numbers = {**v.numbers(), **extra}
        problems = v.problems()
        if problems and self.stacks:
            problems.append("process logs:\n" + self.stacks[-1].logs(25))
        return problems

    def close(self) -> None:
        for stack in self.stacks:
            stack.stop()


@pytest.fixture(scope="session")
def chaos_tools() -> None:
    problems = missing_tools()
    if problems:
        missing("chaos drills need: " + "; ".join(problems))


@pytest.fixture
def chaos(request: pytest.FixtureRequest, tmp_path: Path, chaos_tools: None,
          fresh_llm_sim: Any) -> Iterator[Chaos]:
    drill = Chaos(tmp_path, Sim(fresh_llm_sim.url), request.node.nodeid)
    try:
        yield drill
    finally:
        drill.close()
        _RESULTS.append((request.node.name, time.monotonic() - drill.started, drill.numbers))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    terminalreporter.section("chaos drills")
    total = 0.0
    for name, seconds, numbers in _RESULTS:
        total += seconds
        brief = {k: numbers[k] for k in ("requests", "successes", "lost", "duplicated", "bad_5xx",
                                         "late", "broken", "failed_after_recovery", "by_status",
                                         "recovery_s", "retried")
                 if k in numbers}
        extra = {k: v for k, v in numbers.items() if k not in brief and k not in (
            "llm_calls", "p50_ms", "p99_ms")}
        terminalreporter.write_line(f"{name}: {seconds:.1f} s {brief} {extra}")
    terminalreporter.write_line(f"all drills: {total:.1f} s")
