"""WebSocket helpers shared by the engine and the ambassador."""

from __future__ import annotations

import threading
from typing import Any


class WholeFrames:
    """A socket whose ``send`` writes everything it is given, one caller at a time.

    simple-websocket writes each frame with one ``socket.send``, which under gevent may
    write only the start of a large frame (a 4 MB ``run_finished`` reached the client cut
    short and the stream was garbage from there), and its reader thread writes pings and
    pongs on the same socket, which must not land inside another frame. Install it with
    ``ws.sock = WholeFrames(ws.sock)`` right after the connection is made.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, data: bytes, *flags: int) -> int:
        with self._lock:
            self._sock.sendall(data, *flags)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
