"""A busy worker still looks at new connections: 16 keep-alive connections keep a gevent
worker's next request always buffered (pipelined), and a 17th connection's first request
is answered within a few rounds of the others, not hundreds of their requests later.

The measure is how many answers the busy connections got while the newcomer waited — an
order of events, not a time, so a slow or loaded machine does not change it. Fair
round-robin is about one answer per busy connection; a worker that reads a keep-alive
connection's buffered requests without polling its sockets (``gevent.sleep(0)`` after
each request: gevent polls only every 50 callbacks) served 60–400 before the newcomer."""

from __future__ import annotations

import selectors
import socket
import sys
import time

import pytest
from support.procs import ServerProcess, free_port

pytestmark = pytest.mark.integration
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
STATUS = b"HTTP/1.1 200 "
BUSY = 16
PIPELINE = 64  # requests each busy connection keeps in flight
ROUNDS_ALLOWED = 3  # answers per busy connection while the newcomer waits


class Answers:
    """Counts the answers arriving on a connection (status lines; split reads handled)."""

    def __init__(self) -> None:
        self.tail = b""

    def count(self, data: bytes) -> int:
        data = self.tail + data
        self.tail = data[-(len(STATUS) - 1):]
        return data.count(STATUS)


def served_before_newcomer(port: int) -> int:
    selector = selectors.DefaultSelector()
    busy = []
    try:
        for _ in range(BUSY):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(REQUEST * PIPELINE)
            conn.setblocking(False)
            selector.register(conn, selectors.EVENT_READ, Answers())
            busy.append(conn)

        def pump(deadline: float, until: socket.socket | None = None) -> int:
            """Keep each busy pipeline full until ``deadline``, or until ``until`` gets an
            answer; the answers the busy connections got meanwhile."""
            served = 0
            while time.monotonic() < deadline:
                ready = [key for key, _ in selector.select(0.5)]
                # answers read in one batch came in an unknown order: the newcomer's first
                # (a stalled client must not count what the worker did after answering it)
                ready.sort(key=lambda key: key.fileobj is not until)
                for key in ready:
                    data = key.fileobj.recv(65536)
                    assert data, "the engine closed a connection"
                    answered = key.data.count(data)
                    if key.fileobj is until:
                        if answered:
                            return served
                    elif answered:
                        served += answered
                        key.fileobj.setblocking(True)
                        key.fileobj.sendall(REQUEST * answered)
                        key.fileobj.setblocking(False)
            assert until is None, "the new connection got no answer within 30 s"
            return served

        saturated = 0  # the worker is saturated: every busy connection had about one answer
        for _ in range(60):
            saturated += pump(time.monotonic() + 0.5)
            if saturated >= BUSY:
                break
        assert saturated >= BUSY, f"{saturated} answers in 30 s to {BUSY} busy connections"
        newcomer = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy.append(newcomer)
        newcomer.sendall(REQUEST)
        newcomer.setblocking(False)
        selector.register(newcomer, selectors.EVENT_READ, Answers())
        return pump(time.monotonic() + 30, until=newcomer)
    finally:
        for conn in busy:
            conn.close()


def test_a_new_connection_is_answered_while_keep_alive_connections_keep_a_worker_busy(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port), "--insecure-no-auth"]
    with ServerProcess(cmd, port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                       cwd=tmp_path, env={"DATABASE_URL": f"sqlite:///{tmp_path / 'engine.db'}",
                                          "FLOW_ENGINE_WORKERS": "2"}):
        served = sorted(served_before_newcomer(port) for _ in range(9))
    # The median of 9 trials: a machine busy with other work may stall the client or a
    # worker in a few, while the unfair worker is late in most (measured: fair medians
    # 16-17, highest 26; with sleep(0) medians 83-191)
    assert served[len(served) // 2] <= ROUNDS_ALLOWED * BUSY, (
        f"answers to the {BUSY} busy connections while a new one waited for its first: {served} "
        f"(fair: about {BUSY})")
