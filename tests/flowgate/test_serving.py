"""flowgate.common.serving's gunicorn response: head and body in one write when the length is known.

A real gunicorn request parser reads a real request from a socket pair; the response writes
through a socket that records each ``sendall``, so the number of writes is what is asserted,
and the bytes are parsed back as HTTP."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

from flowgate.common.serving import _one_write_response_class


class Recording:
    """A socket that keeps every sendall."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))


@pytest.fixture
def make_response() -> Iterator:
    pairs: list[socket.socket] = []

    def make(method: str = "GET") -> tuple[wsgi.Response, Recording]:
        client, server = socket.socketpair()
        pairs.extend((client, server))
        client.sendall(f"{method} /x HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        cfg = Config()
        request = next(iter(RequestParser(cfg, server, ("127.0.0.1", 1))))
        sock = Recording()
        response = _one_write_response_class()(request, sock, cfg)
        return response, sock

    yield make
    for s in pairs:
        s.close()


def test_known_length_goes_out_in_one_write(make_response) -> None:
    response, sock = make_response()
    response.start_response("200 OK", [("Content-Type", "application/json"),
                                       ("Content-Length", "7")])
    response.write(b'{"a":1}')
    response.close()
    assert len(sock.writes) == 1
    head, _, body = sock.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 7" in head
    assert body == b'{"a":1}'


def test_a_stream_sends_its_head_at_once_then_each_chunk(make_response) -> None:
    response, sock = make_response()
    response.start_response("200 OK", [("Content-Type", "text/event-stream")])
    response.write(b"data: 1\n\n")
    assert len(sock.writes) >= 2 and sock.writes[0].startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding: chunked" in sock.writes[0]
    assert b"data: 1" not in sock.writes[0]  # the head did not wait for the first event
    response.close()
    assert b"".join(sock.writes).endswith(b"0\r\n\r\n")


@pytest.mark.parametrize(("method", "status"), [("HEAD", "200 OK"), ("GET", "204 No Content")])
def test_a_response_without_body_still_sends_its_head(make_response, method, status) -> None:
    response, sock = make_response(method)
    response.start_response(status, [("Content-Length", "0")])
    response.close()
    assert len(sock.writes) == 1 and sock.writes[0].startswith(f"HTTP/1.1 {status}".encode())


def test_an_empty_body_sends_the_head_once(make_response) -> None:
    response, sock = make_response()
    response.start_response("200 OK", [("Content-Length", "0")])
    response.write(b"")
    response.close()
    assert b"".join(sock.writes).count(b"HTTP/1.1 200 OK") == 1


# -- connection limits: from options and config files to the worker ---------------------------


def test_connection_limits_come_from_options_and_the_config_file(tmp_path) -> None:
    from gunicorn.workers.ggevent import GeventWorker  # (imports gevent: only here)

    import flowgate.common.gevent_worker as gevent_worker
    import flowgate.common.serving as serving

    conf = tmp_path / "gunicorn_conf.py"
    conf.write_text("worker_class = 'gevent'\nflowgate_body_timeout = 3\nkeepalive = 7\n")

    app = serving.GunicornApp(lambda: None, {"flowgate_header_timeout": 2, "bind": "127.0.0.1:1"},
                              config_file=str(conf))

    assert app.limits == gevent_worker.ConnectionLimits(header_timeout=2.0, body_timeout=3.0)
    assert app.cfg.keepalive == 7
    assert app.cfg.worker_class_str == "flowgate.common.gevent_worker.GeventWorker"
    assert app.cfg.worker_class is gevent_worker.GeventWorker
    assert issubclass(gevent_worker.GeventWorker, GeventWorker)  # gunicorn's, with the limits



def test_a_request_arrives_with_the_last_piece_of_its_head_not_with_its_body() -> None:
    """``request_arrived`` (the start of X-Ambassador-Overhead-Ms and the request duration)
    is when the head's latest piece came in: a client that sends its head slowly is not
    counted as the server's time, gunicorn's parsing of the head is."""
    from flowgate.common.gevent_worker import ConnectionLimits, _Conn

    client, server = socket.socketpair()
    try:
        conn = _Conn(server, ConnectionLimits())
        assert conn.arrived is None
        before = time.perf_counter()
        client.sendall(b"POST /run-flow HTTP/1.1\r\n")
        assert conn.recv(65536)
        first = conn.arrived
        assert first is not None and first >= before
        client.sendall(b"Host: t\r\nContent-Length: 2\r\n\r\n")
        assert conn.recv(65536)
        last = conn.arrived
        assert last > first
        conn.body()  # the head is parsed: reading the body does not move it
        client.sendall(b"{}")
        assert conn.recv(65536) == b"{}"
        assert conn.arrived == last
    finally:
        client.close()
        server.close()
