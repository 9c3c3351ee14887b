"""The gunicorn worker both services (and llm-sim) run in: gunicorn's gevent worker with
:class:`ConnectionLimits` — what one connection may cost a worker.

A request head must arrive in time, a request body too; a body left unread after the answer
is drained (bounded) so that the client reads the answer (a 413) instead of a connection
reset; and idle connections make room for new ones before they fill a worker. It also
notes when each request's head arrived (:func:`request_arrived`), so a service can count
gunicorn's parsing of it as its own time.

gunicorn loads the class by name (``flowgate.common.gevent_worker.GeventWorker``, which
``serving.GunicornApp`` puts in place of ``gevent``); it is built on first use, so importing
this module does not import gevent.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import time
from dataclasses import dataclass, fields
from typing import Any

# when the head of the request being served arrived (its last piece, perf_counter), before
# gunicorn parsed it; None when unknown (its bytes came with the previous request's)
_ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar("arrived", default=None)


def request_arrived() -> float | None:
    """``time.perf_counter()`` when the head of the request this greenlet serves arrived:
    the start of the time its answer took this process, parsing included (None: not served
    by a worker of this module, or pipelined behind another)."""
    return _ARRIVED.get()


@dataclass(frozen=True)
class ConnectionLimits:
    """What a connection may cost a worker (``flowgate_*`` options; times in seconds).

    - ``header_timeout``: a new connection must start its request within this, and a
      request head must be complete this long after its first byte (slow-loris clients
      are closed). Between keep-alive requests a connection may idle for gunicorn's
      ``keepalive``.
    - ``body_timeout``: the request body must have arrived this long after its head; a read
      past it raises :class:`BodyTimeout` in the app (answer 408) and the connection closes.
    - ``drain_bytes``: a body the app did not read (a 413 answered from Content-Length, a
      chunked body over the limit) is read and discarded up to this much, for at most
      ``linger_s``, so the client can finish sending and read the answer instead of a
      connection reset; more than that and the server stops writing (FIN), keeps reading
      until ``linger_s`` and closes (nginx's lingering close).
    - ``idle_reserve``: when fewer than this share of ``worker_connections`` is free, each
      new connection closes the connection idle the longest (no request in progress), so
      idle clients never lock probes and real requests out of a worker.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    drain_bytes: int = 8 * 1024 * 1024
    linger_s: float = 5.0
    idle_reserve: float = 0.05

    @classmethod
    def pick(cls, options: dict[str, Any]) -> ConnectionLimits:
        """Take the ``flowgate_*`` entries out of ``options`` (None keeps a default)."""
        values = {}
        for f in fields(cls):
            value = options.pop(f"flowgate_{f.name}", None)
            if value is not None:
                values[f.name] = type(f.default)(value)
        return cls(**values)


class BodyTimeout(TimeoutError):
    """The request body did not arrive within ``body_timeout`` (see ConnectionLimits)."""


_WAIT, _HEAD, _BODY, _DRAIN = range(4)  # the phases of a request on a connection


class _Conn:
    """A connection as gunicorn's request parser reads it: each ``recv`` waits no longer
    than the request's phase allows (see ConnectionLimits). The app and the response get
    the plain socket (``sock``), so a WebSocket after its upgrade has no such limit."""

    __slots__ = ("arrived", "deadline", "idle_since", "limits", "phase", "reaped", "served",
                 "sock", "timed_out")

    def __init__(self, sock: socket.socket, limits: ConnectionLimits) -> None:
        self.sock, self.limits = sock, limits
        self.reaped = self.timed_out = False
        self.arrived: float | None = None
        self.served = 0
        self.wait(limits.header_timeout)

    def wait(self, idle_s: float) -> None:
        """Waiting for a request: idle for at most ``idle_s``, then ``header_timeout`` for
        the head from its first byte."""
        self.phase, self.idle_since = _WAIT, time.monotonic()
        self.deadline = self.idle_since + idle_s

    def body(self) -> None:
        self.phase, self.deadline = _BODY, time.monotonic() + self.limits.body_timeout

    def drain(self) -> None:
        self.phase, self.deadline = _DRAIN, time.monotonic() + self.limits.linger_s

    @property
    def idle(self) -> bool:
        return self.phase == _WAIT and not self.reaped

    def recv(self, size: int, *flags: int) -> bytes:
        data = None
        remaining = self.deadline - time.monotonic()
        if remaining > 0:
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(size, *flags)
            except TimeoutError:
                pass
            finally:
                self.sock.settimeout(None)
        if data is None:  # out of time
            if self.phase in (_WAIT, _HEAD):
                return b""  # as if the client had left: gunicorn closes the connection
            self.timed_out = True
            raise BodyTimeout(f"the request body did not arrive within "
                              f"{self.limits.body_timeout:g} s")
        if data and self.phase in (_WAIT, _HEAD):
            if self.phase == _WAIT:
                self.phase, self.deadline = _HEAD, time.monotonic() + self.limits.header_timeout
            self.arrived = time.perf_counter()  # the head's latest piece: a slow client's
        return data  # sending is not counted, the parsing of what it sent is

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class _WaitForHead:
    """gunicorn's ``timeout_ctx`` around reading a request head: the connection's deadlines
    instead of one gevent.Timeout of ``keepalive`` seconds for idling and the head together."""

    __slots__ = ("conn", "keepalive")

    def __init__(self, conn: _Conn, keepalive: float) -> None:
        self.conn, self.keepalive = conn, keepalive

    def __enter__(self) -> None:
        conn = self.conn
        conn.wait(self.keepalive if conn.served and self.keepalive else conn.limits.header_timeout)

    def __exit__(self, *exc: object) -> None:
        return None


def _settle(conn: _Conn, req: Any) -> bool:
    """After the answer went out: discard what is left of the request body, within
    ``drain_bytes`` and ``linger_s``. True when the connection may serve another request;
    False when it is to be closed (after lingering, so the client reads the answer)."""
    if conn.timed_out:
        return False  # a stalled client sends nothing more: close (a FIN, not a reset)
    body = getattr(req, "body", None)
    conn.drain()
    left = conn.limits.drain_bytes
    try:
        while body is not None and left > 0:
            data = body.read(min(65536, left))
            if not data:
                return True
            left -= len(data)
    except Exception:  # noqa: S110 - out of time, a malformed chunk, the client gone
        pass
    _linger(conn)
    return False


def _linger(conn: _Conn) -> None:
    """Stop writing (the client sees the answer end) and read and discard until the client
    stops too or ``linger_s`` is over; closing with unread bytes would send a reset, and a
    reset can destroy the answer before the client reads it."""
    sock, left = conn.sock, max(64 << 20, 8 * conn.limits.drain_bytes)  # time bounds it first
    try:
        sock.shutdown(socket.SHUT_WR)
        while left > 0 and (remaining := conn.deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            data = sock.recv(65536)
            if not data:
                break
            left -= len(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)


def _gevent_worker_class() -> type:
    import gevent
    from gunicorn.workers.base_async import AsyncWorker
    from gunicorn.workers.ggevent import GeventWorker as Base

    class GeventWorker(Base):
        """gunicorn's gevent worker with :class:`ConnectionLimits` (from the app)."""

        def init_process(self) -> None:
            self.limits = getattr(self.app, "limits", None) or ConnectionLimits()
            self.connections: dict[Any, _Conn] = {}  # greenlet → its connection
            super().init_process()

        def timeout_ctx(self):
            conn = self.connections.get(gevent.getcurrent())
            return _WaitForHead(conn, self.cfg.keepalive) if conn else super().timeout_ctx()

        def handle(self, listener, client, addr) -> None:
            client.setblocking(1)
            conn, me = _Conn(client, self.limits), gevent.getcurrent()
            self.connections[me] = conn
            try:
                self._make_room(conn)
                AsyncWorker.handle(self, listener, conn, addr)
            finally:
                self.connections.pop(me, None)

        def handle_request(self, listener_name, req, sock, addr):
            if not isinstance(sock, _Conn):
                return super().handle_request(listener_name, req, sock, addr)
            sock.body()
            arrived = _ARRIVED.set(sock.arrived)
            sock.arrived = None  # a request pipelined behind this one arrives unseen
            try:
                kept = super().handle_request(listener_name, req, sock.sock, addr)
            except StopIteration:
                _settle(sock, req)
                raise
            finally:
                _ARRIVED.reset(arrived)
            sock.served += 1
            if not _settle(sock, req):
                raise StopIteration()
            return kept

        def _make_room(self, new: _Conn) -> None:
            """Close the longest-idle connections while fewer than ``idle_reserve`` of
            ``worker_connections`` are free (their clients reconnect when they need to)."""
            room = max(1, int(self.worker_connections * self.limits.idle_reserve))
            excess = len(self.connections) - (self.worker_connections - room)
            if excess <= 0:
                return
            idle = sorted((c for c in self.connections.values() if c.idle and c is not new),
                          key=lambda c: c.idle_since)
            for conn in idle[:excess]:
                conn.reaped = True
                with contextlib.suppress(OSError):  # its recv returns b"": it closes
                    conn.sock.shutdown(socket.SHUT_RDWR)

    return GeventWorker


def __getattr__(name: str) -> Any:
    """``GeventWorker`` is built on first use (gunicorn loads it by name): importing this
    module must not import gevent."""
    if name == "GeventWorker":
        cls = globals()["GeventWorker"] = _gevent_worker_class()
        return cls
    raise AttributeError(name)
