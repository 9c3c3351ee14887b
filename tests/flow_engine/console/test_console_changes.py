"""Changing what is live from the console, in headless Chromium against a real engine: a
canary started and stopped keeps the routing it did not touch (the sticky key); a change
shows the audit entry it wrote — not a newer one by someone else — and keeps showing it after
the page reloads; the flows list shows a canary and the last hour's figures of its runs."""

from __future__ import annotations

import re

import pytest
from console_helpers import ADMIN, PUBLISHER, RUNNER, flow_definition, signed_in
from support.waiting import wait_until

pytestmark = pytest.mark.integration


def two_versions(engine, flow_id: str) -> None:
    engine.push(flow_definition(flow_id))
    engine.push(flow_definition(flow_id, template="V2: {question}"))


def change(page, button: str, message: str) -> None:
    page.page.fill("#change-message", message)
    page.page.click(f".actions button:has-text('{button}')")


def test_a_canary_started_and_stopped_in_the_ui_keeps_the_sticky_key(open_page, engine):
    two_versions(engine, "canary-flow")
    engine.call("PUT", "/flows/canary-flow/routing", {"sticky_key": "session_id"})
    page = signed_in(open_page, PUBLISHER, path="/ui/flows/canary-flow")
    page.page.wait_for_selector("svg.graph")

    page.page.select_option("#select-canary-version", "2")
    page.page.fill("#canary-percent", "10")
    change(page, "Start canary", "v2 on a few sessions")
    page.page.wait_for_selector(".change-outcome:has-text('routing by release-bot')")
    assert engine.call("GET", "/flows/canary-flow")["routing"] == {
        "canary": {"version": 2, "percent": 10}, "sticky_key": "session_id"}
    page.page.wait_for_selector("table.audit tr:has-text('v2 on a few sessions')")

    page.page.click("nav a[data-nav='flows']")
    row = page.page.locator("table.flows tr", has_text="canary-flow")
    row.wait_for()
    assert row.locator("td").nth(3).inner_text() == "v2 at 10%"
    row.locator("a", has_text="canary-flow").click()

    change(page, "Stop canary", "v2 looks fine, stop")
    page.page.wait_for_selector(".change-outcome:has-text('v2 looks fine, stop')")
    assert engine.call("GET", "/flows/canary-flow")["routing"] == {
        "canary": None, "sticky_key": "session_id"}
    page.page.wait_for_selector("table.audit tr:has-text('v2 looks fine, stop')")
    assert page.page.locator(".actions button:has-text('Stop canary')").count() == 0


def test_a_change_shows_its_own_audit_entry_and_keeps_it_after_the_reload(open_page, engine):
    """Someone else changes the flow between the publish and its answer reaching the page:
    the page shows the publish's entry (the newest is the other one), and still shows it once
    the page has reloaded (its history then lists the other change)."""
    two_versions(engine, "race-flow")
    page = signed_in(open_page, PUBLISHER, path="/ui/flows/race-flow")
    page.page.wait_for_selector("svg.graph")

    def another_change_lands_first(route):
        answer = route.fetch()  # the publish is made
        engine.call("PUT", "/flows/race-flow/routing",
                    {"sticky_key": "session_id", "message": "someone else's change"}, key=ADMIN)
        route.fulfill(response=answer)

    page.page.route("**/api/v1/flows/race-flow/publish", another_change_lands_first)
    page.page.select_option("#select-version", "2")
    change(page, "Publish", "ship v2")
    page.page.wait_for_selector(".change-outcome:has-text('Done.')")

    newest, publish = engine.call("GET", "/flows/race-flow/audit?limit=2")["entries"]
    assert newest["message"] == "someone else's change" and publish["action"] == "publish"
    expected = f"Done. Audit #{publish['seq']}: publish by release-bot (v1 → v2) — ship v2"
    assert page.page.inner_text(".change-outcome") == expected
    page.page.wait_for_selector("table.audit tr:has-text(\"someone else's change\")")  # reloaded
    assert page.page.inner_text(".change-outcome") == expected
    assert page.page.get_attribute(".change-outcome", "data-seq") == str(publish["seq"])


def test_the_flows_list_shows_the_canary_and_the_last_hours_figures(open_page, engine):
    two_versions(engine, "busy-flow")
    engine.call("PUT", "/flows/busy-flow/routing", {"canary": {"version": 2, "percent": 50}})
    for i in range(4):
        engine.call("POST", "/run/busy-flow", {"input_value": f"question {i}",
                                               "session_id": f"s{i}"}, key=RUNNER)
    wait_until(lambda: sum(v["runs"] for v in engine.call(
        "GET", "/flows/busy-flow/stats?window_s=3600")["versions"]) == 4,
        "the four runs counted in the flow's figures")

    page = signed_in(open_page)
    row = page.page.locator("table.flows tr", has_text="busy-flow")
    row.wait_for()
    assert row.locator("td").nth(3).inner_text() == "v2 at 50%"
    figures = row.locator("td").nth(5)
    figures.locator("li").first.wait_for()
    lines = figures.locator("li").all_inner_texts()
    counted = {}
    for line in lines:
        found = re.fullmatch(r"v(\d+): (\d+) runs, 0\.0% failed, p95 \d+(\.\d+)? ms", line)
        assert found, lines
        counted[int(found[1])] = int(found[2])
    assert sum(counted.values()) == 4 and set(counted) <= {1, 2}, lines
