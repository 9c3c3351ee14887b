"""The console (/ui/) driven in headless Chromium against a real engine and llm-sim: signing
in, the flows list, the graph, a streamed run node by node and token by token, cancel, the
Server-Sent Events fallback, a watch link in a second tab, publish and roll back with their
audit entries, hostile names rendered as text, and a phone-width screen."""

from __future__ import annotations

import pytest
from console_helpers import ADMIN, PUBLISHER, RUNNER, flow_definition, signed_in, start_run

pytestmark = pytest.mark.integration


def test_a_wrong_key_is_refused_and_the_right_one_signs_in(open_page, engine):
    page = open_page()
    page.allowed.append("401")  # the browser logs the refused request itself
    page.goto("/ui/")
    page.page.fill("#api-key", "not-a-key-at-all")
    page.page.click("form.login button[type=submit]")
    page.page.wait_for_selector("#login-error:has-text('invalid API key')")
    assert page.page.evaluate("sessionStorage.length") == 0, "a refused key is not kept"

    page.sign_in(RUNNER)
    page.page.wait_for_selector("table.flows")
    key_in_storage = page.page.evaluate("sessionStorage.getItem('flowgate.key')")
    assert key_in_storage == RUNNER and RUNNER not in page.page.url


def test_the_flows_list_shows_live_latest_and_an_unpublished_edit(open_page, engine):
    engine.push(flow_definition("edited-flow"))
    engine.push(flow_definition("edited-flow", template="Edited: {question}"))  # v2, not live
    page = signed_in(open_page)
    page.page.wait_for_selector("table.flows")
    row = page.page.locator("table.flows tr", has_text="edited-flow")
    assert row.locator("td").nth(1).inner_text() == "v1"
    assert "v2" in row.locator("td").nth(2).inner_text()
    assert row.locator(".badge", has_text="not live").count() == 1
    for flow_id in ("chat", "support-router"):
        assert page.page.locator("table.flows tr", has_text=flow_id).count() == 1
    page.page.wait_for_selector(  # its last change, from the audit log
        "table.flows tr:has-text('edited-flow') td:nth-child(5):has-text('new_version')")


def test_the_graph_has_one_element_per_node_and_edge(open_page, engine):
    definition = engine.call("GET", "/flows/support-router")["definition"]
    page = signed_in(open_page, path="/ui/flows/support-router")
    page.page.wait_for_selector("svg.graph")
    nodes = page.page.locator("svg.graph g.node")
    assert sorted(nodes.evaluate_all("els => els.map(e => e.dataset.node)")) == \
        sorted(n["id"] for n in definition["nodes"])
    assert page.page.locator("svg.graph g.edge").count() == len(definition["edges"])
    assert "true" in page.page.locator("svg.graph g.edge text").all_text_contents()  # the branch's output
    page.page.locator("svg.graph g.node[data-node='route']").click()
    assert "refund" in page.page.inner_text(".node-details")  # its params, on click


def test_a_run_streams_tokens_as_they_come_and_lights_up_its_nodes(open_page, engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=25, reply_tokens=12)
    page = signed_in(open_page, path="/ui/flows/chat")
    page.page.wait_for_selector("svg.graph")
    start_run(page, "Tell me about your shop")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)
    seen = page.page.evaluate("window.__seen")
    before_end = [length for at, length in seen["tokens"] if at <= seen["endedAt"]]
    steps = sorted(set(before_end))
    assert len([n for n in steps if n > 0]) >= 3, f"tokens came in {steps}: not as they arrived"
    moves = {node: [s for s in states if s != "idle"] for node, states in seen["nodes"].items()}
    assert moves == {node: ["running", "done"] for node in ("in", "prompt", "llm", "out")}, moves
    assert page.page.get_attribute(".run-view", "data-transport") == "websocket"
    answer = page.page.inner_text(".tokens")
    run_id = page.page.get_attribute(".run-view", "data-run-id")
    assert engine.call("GET", f"/runs/{run_id}")["output"] == answer
    assert "output_tokens" in page.page.inner_text(".usage")


def test_cancel_stops_the_run(open_page, engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=4, reply_tokens=200)
    page = signed_in(open_page, path="/ui/flows/chat")
    page.page.wait_for_selector("svg.graph")
    start_run(page, "A long answer please")
    page.page.wait_for_selector(".run-view[data-tokens]")  # the first token arrived
    page.page.click(".run-view button:has-text('Cancel')")
    page.page.wait_for_selector(".run-view[data-state='cancelled']", timeout=20_000)
    run_id = page.page.get_attribute(".run-view", "data-run-id")
    status = engine.call("GET", f"/runs/{run_id}")["status"]
    assert status == "cancelled"
    assert page.page.locator("svg.graph g.node[data-node='llm']").get_attribute("data-state") == "stopped"


def test_without_a_websocket_the_run_streams_over_sse(open_page, engine, fresh_llm_sim):
    """A proxy that drops WebSocket upgrades: the socket closes at once, the console runs
    the flow over SSE — once (the same idempotency key), with every event."""
    fresh_llm_sim.configure(tokens_per_s=25, reply_tokens=10)
    page = signed_in(open_page, path="/ui/flows/chat")
    page.page.route_web_socket("**/api/v1/ws/runs**", lambda ws: ws.close(code=1011, reason="blocked"))
    page.page.wait_for_selector("svg.graph")
    runs_before = len(engine.call("GET", "/runs?flow=chat&limit=200")["runs"])
    start_run(page, "Over SSE please")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)
    assert page.page.get_attribute(".run-view", "data-transport") == "sse"
    seen = page.page.evaluate("window.__seen")
    assert len({n for _at, n in seen["tokens"] if n > 0}) >= 3
    assert len(engine.call("GET", "/runs?flow=chat&limit=200")["runs"]) == runs_before + 1


def test_a_socket_dropped_mid_run_is_resumed_without_losing_or_repeating_an_event(
        open_page, engine, fresh_llm_sim):
    """The WebSocket dies after a few events (a proxy restart): the console follows the run
    on over SSE from the last event it saw; the answer is the run's, once."""
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=40)
    page = signed_in(open_page, path="/ui/flows/chat")

    def drop_after_a_few(ws):
        server = ws.connect_to_server()
        forwarded = [0]

        def relay(message):
            if forwarded[0] >= 8:
                return
            ws.send(message)
            forwarded[0] += 1
            if forwarded[0] == 8:
                ws.close(code=4000, reason="proxy restarted")

        server.on_message(relay)

    page.page.route_web_socket("**/api/v1/ws/runs**", drop_after_a_few)
    page.page.wait_for_selector("svg.graph")
    start_run(page, "Keep going")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)
    assert page.page.get_attribute(".run-view", "data-transport") == "sse"  # resumed
    run_id = page.page.get_attribute(".run-view", "data-run-id")
    assert page.page.inner_text(".tokens") == engine.call("GET", f"/runs/{run_id}")["output"]
    steps = page.page.locator(".steps li").all_inner_texts()
    assert len(steps) == len(set(steps)) == 8, steps  # each node's start and end, once


def test_a_watch_link_opened_in_a_second_tab_shows_the_same_run(open_page, engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=10, reply_tokens=30)
    first = signed_in(open_page, path="/ui/flows/chat")
    first.page.wait_for_selector("svg.graph")
    start_run(first, "Shared run")
    first.page.wait_for_selector(".run-view[data-run-id]")
    link = first.page.locator(".run-link a")
    run_id = first.page.get_attribute(".run-view", "data-run-id")
    assert link.get_attribute("href") == f"/ui/runs/{run_id}"

    second = open_page()  # a colleague: their own tab and key
    second.goto(link.get_attribute("href"))
    second.sign_in(ADMIN)
    for page in (first, second):
        page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)
    assert second.page.inner_text(".tokens") == first.page.inner_text(".tokens")
    assert second.page.inner_text(".steps") == first.page.inner_text(".steps")
    assert second.page.inner_text(".steps").startswith("in (ChatInput) started")  # from the start
    assert second.page.locator("svg.graph g.node[data-state='done']").count() == 4


def test_publish_and_roll_back_from_the_ui_show_their_audit_entries(open_page, engine):
    engine.push(flow_definition("release-flow"))
    engine.push(flow_definition("release-flow", template="New: {question}"))
    page = signed_in(open_page, PUBLISHER, path="/ui/flows/release-flow")
    page.page.wait_for_selector("svg.graph")
    page.page.fill("#change-message", "ship the new prompt, ticket OPS-1")
    page.page.select_option("#select-version", "2")
    page.page.click("button:has-text('Publish')")
    page.page.wait_for_selector(".change-outcome:has-text('Audit #')")
    outcome = page.page.inner_text(".change-outcome")
    assert "publish by release-bot" in outcome and "ship the new prompt, ticket OPS-1" in outcome
    assert engine.call("GET", "/flows/release-flow")["live_version"] == 2
    entry = engine.call("GET", "/flows/release-flow/audit?limit=1")["entries"][0]
    assert outcome.startswith(f"Done. Audit #{entry['seq']}: publish")

    page.page.wait_for_selector(".badge:has-text('live v2')")  # the page reloaded its flow
    page.page.fill("#change-message", "answers got worse")
    page.page.click("button:has-text('Roll back')")
    page.page.wait_for_selector(".change-outcome:has-text('rollback by release-bot')")
    assert engine.call("GET", "/flows/release-flow")["live_version"] == 1
    page.page.wait_for_selector("table.audit tr:has-text('answers got worse')")


def test_a_runner_key_cannot_publish_and_is_told_why(open_page, engine):
    engine.push(flow_definition("runner-flow"))
    page = signed_in(open_page, RUNNER, path="/ui/flows/runner-flow")
    page.allowed.append("403")
    page.page.wait_for_selector("svg.graph")
    page.page.fill("#change-message", "try it")
    page.page.click("button:has-text('Publish')")
    page.page.wait_for_selector(".change-outcome:has-text('forbidden')")
    assert "publisher role" in page.page.inner_text(".change-outcome")


def test_the_diff_shows_two_versions_side_by_side(open_page, engine):
    engine.push(flow_definition("diff-flow"))
    engine.push(flow_definition("diff-flow", template="Changed: {question}"))
    page = signed_in(open_page, path="/ui/flows/diff-flow")
    page.page.select_option("#select-from", "1")
    page.page.select_option("#select-to", "2")
    page.page.click("button:has-text('Compare')")
    changed = page.page.locator(".diff-table tr.diff-changed")
    changed.first.wait_for()
    assert changed.count() == 1
    cells = changed.first.locator("td").all_inner_texts()
    assert "Q: {question}" in cells[0] and "Changed: {question}" in cells[1]


HOSTILE = "<img src=x onerror=alert(1)>"


def test_names_params_and_outputs_are_shown_as_text(open_page, engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=0)
    engine.push(flow_definition("hostile-flow", name=HOSTILE, template=HOSTILE + " {question}"))
    page = signed_in(open_page, path="/ui/")
    page.page.wait_for_selector("table.flows")
    assert page.page.locator("table.flows a", has_text=HOSTILE).count() == 1
    page.page.locator("table.flows a", has_text=HOSTILE).click()
    page.page.wait_for_selector("svg.graph")
    assert page.page.inner_text("h1").startswith(HOSTILE)
    start_run(page, "<script>alert(2)</script>")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)
    assert page.page.locator("img[src=x], main script").count() == 0
    page.page.locator("svg.graph g.node[data-node='prompt']").click()
    assert HOSTILE in page.page.inner_text(".node-details")  # as text, not an element
    # nothing ran: an alert would have been recorded as a dialog (asserted at teardown)


def test_recent_runs_list_and_replay(open_page, engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=0)
    result = engine.call("POST", "/run/chat", {"input_value": "hello from an app"}, key=RUNNER)
    page = signed_in(open_page, path="/ui/runs")
    row = page.page.locator("table.runs tr", has_text=result["run_id"][:12])
    row.wait_for()
    assert "succeeded" in row.inner_text() and "orders-app" in row.inner_text()  # its caller
    row.locator("a").first.click()
    page.page.wait_for_selector(".run-view[data-state='finished']")
    assert page.page.inner_text(".tokens") == result["output"]


def test_a_phone_width_screen_needs_no_sideways_scrolling(open_page, engine):
    page = signed_in(open_page, path="/ui/flows/support-router", width=390, height=844)
    page.page.wait_for_selector("svg.graph")
    overflow = page.page.evaluate("document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the screen"
    page.page.reload()  # a fresh load (the key stays in this tab's sessionStorage)
    page.page.wait_for_selector("svg.graph")
    page.page.keyboard.press("Tab")  # the skip link first: keyboard reachable
    assert page.page.evaluate("document.activeElement.textContent") == "Skip to content"
    for control in ("#run-input", "#run-session", "#change-message"):
        label = page.page.locator(f"label[for='{control[1:]}']")
        assert label.count() == 1, f"{control} has no label"


@pytest.mark.parametrize(("path", "table"), [pytest.param("/ui/", "table.flows", id="flows"),
                                             pytest.param("/ui/runs", "table.runs", id="runs")])
def test_the_flows_and_runs_lists_fit_a_phone_width_screen(open_page, engine, fresh_llm_sim,
                                                           path, table):
    engine.call("POST", "/run/support-router", {"input_value": "a run to list"}, key=RUNNER)
    page = signed_in(open_page, path=path, width=390, height=844)
    page.page.wait_for_selector(f"{table} tbody tr")
    overflow = page.page.evaluate("document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than the screen"


def test_every_page_carries_the_security_headers(engine):
    import requests

    for path in ("/ui/", "/ui/flows/x", "/ui/runs/abc"):
        resp = requests.get(f"{engine.url}{path}", timeout=10)
        assert resp.status_code == 200
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Cache-Control"] == "no-cache"
    page = requests.get(f"{engine.url}/ui/", timeout=10).text
    asset = page.split('src="', 1)[1].split('"', 1)[0]
    resp = requests.get(f"{engine.url}{asset}", timeout=10)
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert resp.headers["Content-Type"].startswith("text/javascript")
    assert "<script" not in page.split("</head>")[1], "no inline script"
