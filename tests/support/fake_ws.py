"""A stand-in for ``simple_websocket.Server`` (what the engine's WebSocket handler talks to),
so the run protocol can be driven message by message through the real app."""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import pytest
from simple_websocket import ConnectionClosed

WAIT_S = 15  # upper bound for anything the tests wait for
_GONE = object()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSocket:
    """What ``simple_websocket.Server`` offers the handler: ``send``, ``receive``, ``close``.

    With a :class:`FakeClock`, a ``receive`` that finds nothing to read (after a short real
    wait) moves the clock by its whole timeout, so idle timeouts pass at once."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock
        self.connected = True
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.sock = None  # the view wraps the raw socket in WholeFrames; nothing writes to it
        self.mode = "werkzeug"  # flask-sock then answers the test client with an empty 200
        self._inbox: queue.Queue = queue.Queue()
        self._sent: queue.Queue = queue.Queue()
        self.closed = threading.Event()

    # the client's side
    def feed(self, message: Any) -> None:
        self._inbox.put(message if isinstance(message, str | bytes) else json.dumps(message))

    def disconnect(self) -> None:
        self._inbox.put(_GONE)

    def next_message(self, timeout: float = WAIT_S) -> dict[str, Any]:
        try:
            return self._sent.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the server sent nothing within {timeout} s")

    def until_last_event(self) -> list[dict[str, Any]]:
        """Messages up to and including the run's ``run_finished`` or ``error`` event."""
        messages = [self.next_message()]
        while not (messages[-1]["type"] in ("run_finished", "error") and "seq" in messages[-1]):
            messages.append(self.next_message())
        return messages

    def nothing_sent(self) -> bool:
        return self._sent.empty()

    # the server's side
    def send(self, text: str) -> None:
        if not self.connected:
            raise ConnectionClosed()
        self._sent.put(json.loads(text))

    def receive(self, timeout: float | None = None) -> str | bytes | None:
        if not self.connected:
            raise ConnectionClosed()
        wait = 0.05 if self.clock is not None else timeout
        try:
            item = self._inbox.get(timeout=wait)
        except queue.Empty:
            if self.clock is not None and timeout is not None:
                self.clock.now += timeout
            return None
        if item is _GONE:
            self.connected = False
            raise ConnectionClosed(1001, "client went away")
        return item

    def close(self, reason: int | None = None, message: str | None = None) -> None:
        if not self.connected:
            raise ConnectionClosed()
        self.connected = False
        self.close_code, self.close_reason = reason or 1000, message
        self.closed.set()


class FakeServers:
    """Stands in for ``simple_websocket.Server`` in flask-sock: hands out the sockets in
    ``pending`` (a fresh FakeSocket when there is none) and records each with its options."""

    def __init__(self) -> None:
        self.pending: list[FakeSocket] = []
        self.built: list[tuple[FakeSocket, dict[str, Any]]] = []

    def __call__(self, environ: dict[str, Any], **options: Any) -> FakeSocket:
        ws = self.pending.pop(0) if self.pending else FakeSocket()
        self.built.append((ws, options))
        return ws


def install_fake_server(monkeypatch) -> FakeServers:
    """Make flask-sock hand its connections to a FakeServers (what the fixture does)."""
    import flask_sock

    servers = FakeServers()
    monkeypatch.setattr(flask_sock, "Server", servers)
    return servers
