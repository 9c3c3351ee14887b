"""The ambassador's HTTP/1.1 client against a real socket server that answers byte-exact
scripts: framing (length, chunked, until EOF), keep-alive reuse and when not to reuse, the
typed errors a retry policy relies on, and streams read piece by piece."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from ambassador import http1

Script = Callable[[socket.socket, bytes], None]  # (connection, request bytes) -> writes answer


class ScriptedServer:
    """Accepts connections; for each request read, pops the next script and runs it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.scripts: list[Script] = []
        self.requests: list[tuple[int, bytes]] = []  # (connection number, raw request)
        self.connections = 0
        self.release = threading.Event()  # what ``hold`` scripts wait for (set on close)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(5)
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += conn.recv(65536)
                request, buf = head + b"\r\n\r\n" + buf[:length], buf[length:]
                self.requests.append((number, request))
                script = self.scripts.pop(0)
                if script(conn, request) is False:  # the script closed the connection
                    return

    def close(self) -> None:
        self._stop = True
        self.release.set()
        self.listener.close()
        self._thread.join(2)


def send(data: bytes) -> Script:
    def script(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(data)
    return script


def send_and_close(data: bytes) -> Script:
    def script(conn: socket.socket, _request: bytes) -> bool:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_RDWR)
        return False
    return script


def hold(server: ScriptedServer, data: bytes = b"") -> Script:
    """Send ``data``, then neither answer more nor close until the test ends: the client's
    timeout is the only way out, whatever the machine's load (no sleep to outlast)."""
    def script(conn: socket.socket, _request: bytes) -> bool:
        conn.sendall(data)
        server.release.wait(30)
        return False
    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\": true}"[:-1]


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


@pytest.fixture
def pool(server: ScriptedServer) -> Iterator[http1.Pool]:
    p = http1.Pool("http", "127.0.0.1", server.port, max_idle_s=30)
    yield p
    p.close()


def get(pool: http1.Pool, path: str = "/x", **kw) -> http1.Response:
    return pool.request("GET", path, {"Accept": "application/json"}, None,
                        connect_timeout=kw.get("connect", 1.0), read_timeout=kw.get("read", 2.0))


def test_content_length_body_and_keep_alive_reuse(server, pool) -> None:
    server.scripts += [send(OK), send(OK)]
    for _ in range(2):
        response = get(pool)
        assert (response.status, response.read()) == (200, b'{"ok": true')
        assert response.header("content-type") == "application/json"
    assert server.connections == 1
    first = server.requests[0][1]
    assert first.startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nAccept: application/json\r\n" in first


def test_post_sends_the_body_with_its_length(server, pool) -> None:
    server.scripts.append(send(OK))
    pool.request("POST", "/run", {"Content-Type": "application/json"}, b'{"a": 1}',
                 connect_timeout=1, read_timeout=2).read()
    request = server.requests[0][1]
    assert b"\r\nContent-Length: 8\r\n" in request and request.endswith(b'\r\n\r\n{"a": 1}')


def test_chunked_body_is_decoded_and_streamed_piece_by_piece(server, pool) -> None:
    release = threading.Event()

    def script(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"6;ext=1\r\nevent:\r\n")
        release.wait(5)  # the client must have the first piece before the rest is sent
        conn.sendall(b"5\r\n data\r\n0\r\nX-Trailer: t\r\n\r\n")

    server.scripts += [script, send(OK)]
    response = get(pool)
    pieces = response.stream()
    assert next(pieces) == b"event:"
    release.set()
    assert b"".join(pieces) == b" data"
    get(pool).read()  # read to the end: the connection went back to the pool
    assert server.connections == 1


@pytest.mark.parametrize("answer", [
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", id="http-1.0"),
    pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
                 id="connection-close"),
])
def test_a_connection_the_server_will_close_is_not_reused(server, pool, answer) -> None:
    server.scripts += [send_and_close(answer), send(OK)]
    assert get(pool).read() == b"hi"
    assert get(pool).status == 200
    assert server.connections == 2


def test_http_1_0_keep_alive_is_reused(server, pool) -> None:
    server.scripts += [send(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"),
                       send(OK)]
    get(pool).read()
    get(pool).read()
    assert server.connections == 1


def test_a_body_without_length_runs_to_the_end_of_the_connection(server, pool) -> None:
    server.scripts += [send_and_close(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"), send(OK)]
    assert get(pool).read() == b"until the end"
    get(pool).read()
    assert server.connections == 2


def test_interim_1xx_answers_are_skipped_and_204_has_no_body(server, pool) -> None:
    server.scripts += [send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
                       send(OK)]
    response = get(pool)
    assert (response.status, response.read()) == (204, b"")
    assert get(pool).read() == b'{"ok": true'
    assert server.connections == 1


def test_an_abandoned_stream_closes_its_connection(server, pool) -> None:
    server.scripts += [send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
                       send(OK)]
    response = get(pool)
    pieces = response.stream()
    assert next(pieces) == b"abc"
    response.close()  # the app left mid-stream
    get(pool).read()
    assert server.connections == 2


def test_idle_connections_older_than_max_idle_are_not_reused(server, clock) -> None:
    pool = http1.Pool("http", "127.0.0.1", server.port, max_idle_s=3, clock=clock)
    try:
        server.scripts += [send(OK), send(OK), send(OK)]
        get(pool).read()
        clock.advance(3)
        get(pool).read()  # idle exactly max_idle_s: reused
        assert server.connections == 1
        clock.advance(3.01)
        get(pool).read()
        assert server.connections == 2
    finally:
        pool.close()


def test_a_reused_connection_the_server_reset_is_written_again_on_a_new_one(server, pool) -> None:
    """The peer closed the idle connection and the write fails outright: nothing was read by
    the peer, so the request goes out once more on a new connection."""
    server.scripts.append(send(OK))
    get(pool).read()
    conn = pool._idle[-1]
    # make the pooled socket unwritable, as a reset by the peer would
    conn.sock.shutdown(socket.SHUT_WR)
    server.scripts.append(send(OK))
    assert get(pool).read() == b'{"ok": true'
    assert server.connections == 2


def test_connection_refused_is_connect_failed(dead_port) -> None:
    pool = http1.Pool("http", "127.0.0.1", dead_port)
    with pytest.raises(http1.ConnectFailed):
        get(pool)


def test_no_answer_within_the_read_timeout_is_timeout(server, pool) -> None:
    server.scripts.append(hold(server))
    with pytest.raises(http1.Timeout):
        get(pool, read=0.1)


def test_a_stream_idle_past_its_timeout_is_timeout(server, pool) -> None:
    server.scripts.append(hold(server, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                       b"1\r\na\r\n"))
    response = get(pool)
    response.set_read_timeout(0.1)
    pieces = response.stream()
    assert next(pieces) == b"a"
    with pytest.raises(http1.Timeout):
        next(pieces)


@pytest.mark.parametrize("answer", [
    pytest.param(b"", id="nothing"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="mid-head"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", id="mid-body"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", id="mid-chunk"),
])
def test_a_connection_closed_early_is_broken(server, pool, answer) -> None:
    server.scripts.append(send_and_close(answer))
    with pytest.raises(http1.Broken):
        get(pool).read()


@pytest.mark.parametrize("answer", [
    pytest.param(b"SSH-2.0-OpenSSH\r\n\r\n", id="not-http"),
    pytest.param(b"HTTP/1.1 abc OK\r\n\r\n", id="bad-status"),
    pytest.param(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", id="bad-header"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", id="bad-length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk"),
])
def test_an_answer_that_is_not_http_is_bad_response(server, pool, answer) -> None:
    server.scripts.append(send_and_close(answer))
    with pytest.raises(http1.BadResponse):
        get(pool).read()


def test_a_header_value_with_a_line_break_is_refused_before_sending(server, pool) -> None:
    with pytest.raises(ValueError, match="line break"):
        pool.request("GET", "/x", {"X-Evil": "a\r\nInjected: 1"}, None,
                     connect_timeout=1, read_timeout=1)
    assert server.requests == []


@pytest.mark.parametrize(("path", "headers", "words"), [
    pytest.param("/api/v1/runs/r1\n/events", {}, "path", id="newline-in-the-path"),
    pytest.param("/api/v1/runs/r1 HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /x", {}, "path",
                 id="request-smuggled-in-the-path"),
    pytest.param("/api/v1/run/f\u00e4q", {}, "path", id="non-ascii-path"),
    pytest.param("/x", {"Idempotency-Key": "cl\u00e9"}, "non-ASCII", id="latin-1-header"),
    pytest.param("/x", {"Idempotency-Key": "\u0101"}, "non-ASCII", id="header-beyond-latin-1"),
])
def test_what_cannot_be_written_as_http_is_refused_before_sending(server, pool, path, headers,
                                                                  words) -> None:
    with pytest.raises(http1.InvalidRequest, match=words):
        pool.request("GET", path, headers, None, connect_timeout=1, read_timeout=1)
    assert server.requests == [] and server.connections == 0


def _self_signed(tmp_path):
    """A key and a self-signed certificate for 127.0.0.1 (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowgate-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_verifies_the_engine_certificate(tmp_path) -> None:
    """TLS to the engine: a certificate no trusted CA signed is refused at connect time (the
    request never left), and one the pool trusts carries requests."""
    import ssl

    cert_file, key_file = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(OK)
            except (ssl.SSLError, OSError):
                conn.close()  # the untrusting client hung up mid-handshake

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        untrusting = http1.Pool("https", "127.0.0.1", port)
        with pytest.raises(http1.ConnectFailed, match="TLS"):
            get(untrusting)
        trusting = http1.Pool("https", "127.0.0.1", port)
        trusting._ssl.load_verify_locations(cert_file)
        assert get(trusting).read() == b'{"ok": true'
    finally:
        listener.close()
        thread.join(5)
