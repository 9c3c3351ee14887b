"""The ambassador's view of a flow's routing (ambassador/routing_view.py) when the engine's
flow record cannot be read: a view older than the re-check is unknown — the cache then
bypasses, never guessing the version — and the engine is asked again after ``check_s``, not
on every request. The clock is the test's; the engine's answers are scripted."""

from __future__ import annotations

from typing import Any

from ambassador.routing_view import CHECK_S, RoutingView


class Engine:
    """``GET /api/v1/flows/{ref}`` as the view reads it: the record, or a failure."""

    def __init__(self) -> None:
        self.live = 1
        self.down = False
        self.reads = 0

    def fetch(self, ref: str) -> dict[str, Any] | None:
        self.reads += 1
        if self.down:
            raise ConnectionError("engine unreachable")
        return {"id": ref, "name": ref, "live_version": self.live, "routing": None}


def test_a_view_past_its_re_check_is_unknown_while_the_engine_cannot_be_asked(clock):
    engine = Engine()
    view = RoutingView(engine.fetch, clock=clock)
    assert view.version_for("faq", {}) == 1

    engine.live, engine.down = 2, True  # a publish the ambassador cannot learn of
    clock.advance(CHECK_S - 0.1)
    assert view.version_for("faq", {}) == 1  # within the re-check: the view stands
    assert engine.reads == 1
    clock.advance(0.2)
    assert view.version_for("faq", {}) is None  # re-check failed: unknown, not version 1
    clock.advance(CHECK_S - 0.1)
    assert view.version_for("faq", {}) is None  # still unknown after the failed try's timer
    assert engine.reads == 2  # ... and the engine was not asked on every request
    clock.advance(CHECK_S * 10)
    assert view.version_for("faq", {}) is None  # however long it lasts
    assert engine.reads == 3

    engine.down = False
    clock.advance(CHECK_S)
    assert view.version_for("faq", {}) == 2


def test_the_last_view_still_names_a_version_for_stale_if_error(clock):
    engine = Engine()
    view = RoutingView(engine.fetch, clock=clock)
    view.version_for("faq", {})
    engine.down = True
    clock.advance(CHECK_S * 30)

    assert view.version_for("faq", {}) is None
    # only for an answer when the engine fails, and only from a view young enough
    assert view.last_version_for("faq", {}, max_age_s=CHECK_S * 31) == 1
    assert view.last_version_for("faq", {}, max_age_s=CHECK_S * 29) is None
    assert view.last_version_for("never-seen", {}, max_age_s=3600) is None
    assert view.version_for("faq", {"version": 3}) == 3  # a pin needs no view


def test_an_unknown_flow_read_first_while_the_engine_is_down_is_unknown(clock):
    engine = Engine()
    engine.down = True
    view = RoutingView(engine.fetch, clock=clock)
    assert view.version_for("faq", {}) is None
    assert view.version_for("faq", {}) is None
    assert engine.reads == 1
    engine.down = False
    clock.advance(CHECK_S)
    assert view.version_for("faq", {}) == 1
