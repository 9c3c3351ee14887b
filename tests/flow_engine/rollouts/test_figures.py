"""The console's per-version figures (flow_engine/rollouts/figures.py): the live, canary and
latest versions only, computed at most every FRESH_S per flow and window, and a 503 — not a
500 — when the shared window does not answer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flow_engine.rollouts.analysis import Outcomes
from flow_engine.rollouts.figures import FRESH_S, FiguresUnavailable, RecentFigures


class Window:
    def __init__(self) -> None:
        self.reads: list[int] = []
        self.down = False

    def window(self, flow_id, version, since, until):
        if self.down:
            raise ConnectionError("redis down")
        self.reads.append(version)
        seen = Outcomes()
        for _ in range(version):  # version n: n runs, the last one failed
            seen.add(False, 0.2)
        seen.add(True, 3.0)
        return seen


def flow(**kw):
    return SimpleNamespace(**{"id": "f", "live_version": 3, "latest_version": 7, "routing": None, **kw})


def test_only_the_versions_people_look_at_are_read():
    window = Window()
    figures = RecentFigures(window).of(flow(routing={"canary": {"version": 5, "percent": 10}}), 3600)
    assert [v["version"] for v in figures["versions"]] == [7, 5, 3]
    assert sorted(window.reads) == [3, 5, 7]
    live = figures["versions"][2]
    assert (live["live"], live["runs"], live["failed"], live["failure_rate"]) == (True, 4, 1, 0.25)
    assert figures["versions"][1]["canary"] is True


def test_figures_are_kept_a_few_seconds_per_flow_and_window():
    window, now = Window(), [0.0]
    figures = RecentFigures(window, clock=lambda: now[0])
    figures.of(flow(), 3600)
    figures.of(flow(), 3600)
    assert len(window.reads) == 2  # live and latest, once
    figures.of(flow(), 60)  # another window: read
    assert len(window.reads) == 4
    now[0] = FRESH_S + 0.1
    figures.of(flow(), 3600)
    assert len(window.reads) == 6


def test_a_window_that_does_not_answer_is_a_503():
    window = Window()
    window.down = True
    with pytest.raises(FiguresUnavailable) as raised:
        RecentFigures(window).of(flow(), 3600)
    assert raised.value.status == 503
