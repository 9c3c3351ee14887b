"""How the console connects to a run, in headless Chromium against a real engine and llm-sim:
the WebSocket opens with a one-time ticket (never the key); a WebSocket that neither opens nor
closes (a proxy holding the upgrade) gives way to SSE after the open timeout; and when SSE
cannot follow the run either, the page says the connection was lost instead of "running"."""

from __future__ import annotations

import pytest
from console_helpers import ADMIN, signed_in, start_run

pytestmark = pytest.mark.integration

# The run socket stays CONNECTING for ever: no open, no close, no error (what a proxy that
# accepts the upgrade request and never answers looks like to the page). Other sockets are
# the browser's own.
HANGING_RUN_SOCKET = """(() => {
  const Native = window.WebSocket;
  window.__hanging = 0;
  function Hanging(url, protocols) {
    if (!String(url).includes('/api/v1/ws/runs')) return new Native(url, protocols);
    window.__hanging += 1;
    const socket = new EventTarget();
    socket.url = String(url);
    socket.readyState = 0;
    socket.send = () => { throw new DOMException('still connecting', 'InvalidStateError'); };
    socket.close = () => { socket.readyState = 3; };
    return socket;
  }
  Object.assign(Hanging, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
  window.WebSocket = Hanging;
})();"""


def test_the_websocket_opens_with_a_ticket_never_with_the_key(open_page, engine, fresh_llm_sim):
    page = signed_in(open_page, path="/ui/flows/chat")
    sockets = []
    sent: list[str] = []
    page.page.on("websocket", lambda ws: (sockets.append(ws), ws.on(
        "framesent", lambda payload: sent.append(str(payload)))))
    page.page.wait_for_selector("svg.graph")
    start_run(page, "Who am I?")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)

    assert page.page.get_attribute(".run-view", "data-transport") == "websocket"
    assert len(sockets) == 1
    url = sockets[0].url
    assert "/api/v1/ws/runs?ticket=" in url, url
    assert ADMIN not in url and "token=" not in url and "key" not in url.lower(), url
    assert any('"type": "run"' in frame or '"type":"run"' in frame for frame in sent), sent
    assert all(ADMIN not in frame for frame in sent), "nor is it sent over the socket"


def test_a_websocket_that_never_opens_gives_way_to_sse(open_page, engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=25, reply_tokens=8)
    page = open_page()
    page.page.add_init_script(HANGING_RUN_SOCKET)
    page.goto("/ui/flows/chat")
    page.sign_in(ADMIN)
    page.page.wait_for_selector("svg.graph")
    runs_before = len(engine.call("GET", "/runs?flow=chat&limit=200")["runs"])

    start_run(page, "Anyone there?")
    page.page.wait_for_selector(".run-view[data-state='finished']", timeout=30_000)

    assert page.page.evaluate("window.__hanging") == 1
    assert page.page.get_attribute(".run-view", "data-transport") == "sse"
    run_id = page.page.get_attribute(".run-view", "data-run-id")
    assert page.page.inner_text(".tokens") == engine.call("GET", f"/runs/{run_id}")["output"]
    assert len(engine.call("GET", "/runs?flow=chat&limit=200")["runs"]) == runs_before + 1


def test_when_sse_cannot_follow_the_run_either_the_page_says_the_connection_is_lost(
        open_page, engine, fresh_llm_sim):
    """The socket drops mid-run and every SSE request to resume is refused by the network:
    after its retries the page shows a final "connection lost", not a run still going."""
    fresh_llm_sim.configure(tokens_per_s=10, reply_tokens=60)
    page = signed_in(open_page, path="/ui/flows/chat")
    page.allowed.append("net::ERR_FAILED")  # the browser logs each refused request

    def drop_after_a_few(ws):
        server = ws.connect_to_server()
        forwarded = [0]

        def relay(message):
            forwarded[0] += 1
            if forwarded[0] <= 4:
                ws.send(message)
            if forwarded[0] == 4:
                ws.close(code=4000, reason="proxy restarted")

        server.on_message(relay)

    page.page.route_web_socket("**/api/v1/ws/runs**", drop_after_a_few)
    page.page.route("**/api/v1/runs/*/events", lambda route: route.abort())
    page.page.wait_for_selector("svg.graph")

    start_run(page, "Keep going")
    page.page.wait_for_selector(".run-view[data-state='lost']", timeout=30_000)

    assert page.page.inner_text(".run-status").startswith("Connection lost")
    run_id = page.page.get_attribute(".run-view", "data-run-id")
    assert page.page.get_attribute(".run-link a", "href") == f"/ui/runs/{run_id}"
    assert page.page.is_disabled(".run-view button:has-text('Cancel')")
