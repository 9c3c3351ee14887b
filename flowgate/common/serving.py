"""Serve a WSGI app under gunicorn from Python, without a gunicorn command line.

Used by the LLM simulator, the flow engine and the ambassador so that each one is
started the same way (``python -m ...`` or a console command) and gets the same
production server: a gunicorn master with gevent workers.

The app is passed as a zero-argument *factory*, not as an app object, because the
gevent worker monkey-patches the standard library when it starts.  Anything built
before that (locks, sockets, HTTP clients) would be the blocking, unpatched kind,
so the factory is called inside each worker, after patching.  Consequently every
worker has its own app instance and its own in-memory state.

Workers are gunicorn's gevent worker plus connection limits set like gunicorn settings
(``flowgate_*`` names): ``flowgate/common/gevent_worker.py``. Here: the application that
builds each worker's app, its responses written in one piece (``OneWriteResponse``), and
one yield to the other connections after each request (:class:`YieldFirst`).

Example::

    from flowgate.common.serving import serve
    serve(lambda: create_app(settings), host="127.0.0.1", port=8080, workers=2)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from gunicorn.app.base import BaseApplication

from flowgate.common import gc_pauses, saturation
from flowgate.common.gevent_worker import ConnectionLimits

WSGIApp = Callable[..., Any]
#: Defaults applied unless the caller overrides them.  ``accesslog=None`` keeps
#: access logging off (load benchmarks would otherwise measure log I/O).
DEFAULT_OPTIONS: dict[str, Any] = {
    "workers": 1,
    "worker_class": "gevent",  # served by flowgate.common.gevent_worker.GeventWorker
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
                value = "flowgate.common.gevent_worker.GeventWorker"  # with ConnectionLimits
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
