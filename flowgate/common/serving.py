"""Serve a WSGI app under gunicorn from Python, without a gunicorn command line.

Used by the LLM simulator, the flow engine and the ambassador so that each one is
started the same way (``python -m ...`` or a console command) and gets the same
production server: a gunicorn master with gevent workers.

The app is passed as a zero-argument *factory*, not as an app object, because the
gevent worker monkey-patches the standard library when it starts.  Anything built
before that (locks, sockets, HTTP clients) would be the blocking, unpatched kind,
so the factory is called inside each worker, after patching.  Consequently every
worker has its own app instance and its own in-memory state.

Workers are gunicorn's gevent worker plus connection limits (:class:`ConnectionLimits`,
set like gunicorn settings, ``flowgate_*`` names): a request head must arrive in time, a
request body too, a body left unread after the answer is drained (bounded) so that the
client reads the answer (a 413) instead of a connection reset, and idle connections make
room for new ones before they fill a worker.

Example::

    from flowgate.common.serving import serve
    serve(lambda: create_app(settings), host="127.0.0.1", port=8080, workers=2)
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from gunicorn.app.base import BaseApplication

from flowgate.common import gc_pauses, saturation

WSGIApp = Callable[..., Any]
# when the head of the request being served arrived (its last piece, perf_counter), before
# gunicorn parsed it; None when unknown (its bytes came with the previous request's)
_ARRIVED: contextvars.ContextVar[float | None] = contextvars.ContextVar("arrived", default=None)


def request_arrived() -> float | None:
    """``time.perf_counter()`` when the head of the request this greenlet serves arrived:
    the start of the time its answer took this process, parsing included (None: not served
    by a worker of this module, or pipelined behind another)."""
    return _ARRIVED.get()

#: Defaults applied unless the caller overrides them.  ``accesslog=None`` keeps
#: access logging off (load benchmarks would otherwise measure log I/O).
DEFAULT_OPTIONS: dict[str, Any] = {
    "workers": 1,
    "worker_class": "gevent",  # served by flowgate.common.serving.GeventWorker (see there)
    "worker_connections": 1000,
    "timeout": 30,
    "graceful_timeout": 30,
    "keepalive": 5,
    "accesslog": None,
    "errorlog": "-",
    "loglevel": "info",
    # gunicorn >= 25 opens a control socket at one fixed per-user path by default, so
    # a second server on the same host (sim + engine + ambassador in tests) would clash.
    "control_socket_disable": True,
}


class GunicornApp(BaseApplication):
    """A gunicorn application built from an app factory and a dict of gunicorn settings.

    ``options`` takes gunicorn setting names (``bind``, ``workers``, ``worker_class``,
    ``worker_connections``, ``timeout``, ``graceful_timeout``, ``keepalive``,
    ``accesslog``, ``loglevel``, ``proc_name``, ...).  Values of ``None`` leave the
    default in place, except ``accesslog`` where ``None`` means "off".  Unknown
    names raise ``ValueError`` so typos do not pass silently.
    """

    def __init__(self, app_factory: Callable[[], WSGIApp], options: dict[str, Any] | None = None,
                 config_file: str | None = None):
        self._app_factory = app_factory
        file_options = read_config_file(config_file) if config_file else {}
        options = {**DEFAULT_OPTIONS, **file_options, **(options or {})}
        self.limits = ConnectionLimits.pick(options)  # the workers read it (forked copies)
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        assert self.cfg is not None
        for key, value in self._options.items():
            name = key.lower()
            if name not in self.cfg.settings:
                raise ValueError(f"unknown gunicorn setting: {key!r}")
            if name == "worker_class" and value == "gevent":
                value = "flowgate.common.serving.GeventWorker"  # gevent's, with ConnectionLimits
            if value is not None or name == "accesslog":
                self.cfg.set(name, value)

    def load(self) -> WSGIApp:
        # Runs in the worker process after the worker class has monkey-patched.
        use_one_write_responses()
        saturation.under_master(os.getppid())  # the metrics describe the master's tree
        app = self._app_factory()
        gc_pauses.freeze()  # what start-up built stays: full collections skip it
        if "gevent" in str(self.cfg.worker_class_str).lower():
            return YieldFirst(app)
        return app


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


class _Held:
    """Stands in for the socket while gunicorn writes a response head: keeps the bytes."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def sendall(self, data: bytes) -> None:
        self.data += data


def _one_write_response_class():
    from gunicorn.http import wsgi

    class OneWriteResponse(wsgi.Response):
        """A gunicorn HTTP/1.1 response that sends its head together with the first body
        bytes when the body's length is known, instead of in a write of its own.

        Each write to a loopback socket costs a system call and a wake-up of the reader,
        and a reader of the head then waits for the body in a second read: for a small JSON
        answer that is most of what serving it costs in the network stack. Streams
        (unknown length, chunked) send their head at once as before, so a client sees the
        status of a long response immediately. ``sendfile`` is not used (bodies go through
        ``write``); neither service serves files.
        """

        _held: bytes | None = None

        def send_headers(self) -> None:
            if self.headers_sent or self.response_length is None or self.chunked:
                super().send_headers()
                return
            sock, self.sock = self.sock, _Held()
            try:
                super().send_headers()
                self._held = self.sock.data
            finally:
                self.sock = sock

        def _emit_body(self, data: bytes) -> None:
            held, self._held = self._held, None
            if held is not None and not self.chunked:
                self.sock.sendall(held + data)
                return
            if held is not None:
                self.sock.sendall(held)
            super()._emit_body(data)

        def can_sendfile(self) -> bool:
            return False

        def close(self) -> None:
            if not self.headers_sent:
                self.send_headers()
            held, self._held = self._held, None
            if held:  # no body was written (HEAD, 204, an empty body)
                self.sock.sendall(held)
            super().close()

    return OneWriteResponse


def use_one_write_responses() -> None:
    """Make gunicorn build its HTTP/1.1 responses as ``OneWriteResponse`` (see there).
    gunicorn has no setting for the response class, so its module default is replaced; call
    it in the worker process, before serving."""
    from gunicorn.http import wsgi

    if getattr(wsgi.Response, "flowgate_one_write", False):
        return
    cls = _one_write_response_class()
    cls.flowgate_one_write = True
    wsgi.Response = cls


YIELD_S = 1e-6  # > 0: after the hub's next poll (see YieldFirst)


class YieldFirst:
    """WSGI middleware for gevent workers: yield to the hub once per request, after it.

    A keep-alive connection whose next request is already buffered is read without
    blocking, so its greenlet would serve request after request while other connections
    starve (seen: p75 of 200 ms at 8 connections against a median of 4 ms). One cooperative
    yield per request restores round-robin fairness. It happens when the response has been
    written (as the WSGI iterable is closed), so it never delays an answer.

    The yield is a sleep of a positive time, not ``sleep(0)``: a zero sleep is a loop
    callback, and gevent runs callbacks back to back, polling its sockets only every 50 of
    them, so busy connections still kept new ones and socket events waiting for hundreds of
    requests (c16 p99 1.5–2 s against a p50 of 47 ms). A timer resumes the greenlet only
    after the loop's next poll (tests/integration/test_engine_fairness.py).
    """

    def __init__(self, app: WSGIApp) -> None:
        import gevent

        self.app = app
        self._sleep = gevent.sleep

    def __call__(self, environ, start_response):
        return _ThenYield(self.app(environ, start_response), self._sleep)


class _ThenYield:
    """A WSGI response iterable that yields to the hub after its ``close``."""

    __slots__ = ("_inner", "_sleep")

    def __init__(self, inner, sleep) -> None:
        self._inner, self._sleep = inner, sleep

    def __iter__(self):
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            gc_pauses.drain()  # the collections during the request, into the metrics
            self._sleep(YIELD_S)


def read_config_file(path: str) -> dict[str, Any]:
    """The gunicorn settings a Python config file defines (like ``gunicorn -c FILE``):
    every top-level name that is a gunicorn setting, hooks included."""
    from gunicorn.config import Config

    namespace: dict[str, Any] = {"__file__": path, "__name__": "__gunicorn_config__"}
    with open(path, encoding="utf-8") as fh:
        exec(compile(fh.read(), path, "exec"), namespace)  # noqa: S102 - our own config file
    known = set(Config().settings) | {f"flowgate_{f.name}" for f in fields(ConnectionLimits)}
    return {k: v for k, v in namespace.items() if k in known}


def bind_address(host: str, port: int) -> str:
    """Return gunicorn's ``bind`` string, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(
    app_factory: Callable[[], WSGIApp],
    *,
    host: str,
    port: int,
    workers: int | None = 1,
    config_file: str | None = None,
    **options: Any,
) -> None:
    """Run ``app_factory()`` under gunicorn on ``host:port`` until the master is stopped.

    Blocks; SIGTERM/SIGINT stop the server gracefully (``graceful_timeout``).
    Extra keyword arguments are gunicorn settings, see :class:`GunicornApp`.
    """
    opts = {**options, "bind": bind_address(host, port)}
    if workers is not None:
        opts["workers"] = workers
    GunicornApp(app_factory, opts, config_file=config_file).run()


# -- the worker: gunicorn's gevent worker with ConnectionLimits ---------------------------------

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
