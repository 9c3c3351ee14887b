"""The engine as users run it: `flowgate engine` (gunicorn master + 2 gevent workers) on a
free port, with the real llm-sim behind the `openai` provider."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import sseclient
from support.procs import ServerProcess, free_port
from support.waiting import wait_until

from flowgate.llm_sim import count_prompt_tokens, reply_tokens

pytestmark = pytest.mark.integration
KEY = "integration-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FLOW = {
    "id": "sim-chat",
    "name": "Chat through llm-sim",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "llm", "type": "ChatModel",
         "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}],
}


def start_engine(tmp_path, sim, **env):
    port = free_port()
    cmd = [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)]
    return ServerProcess(cmd, port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                         cwd=tmp_path, env={
                             "FLOW_ENGINE_API_KEYS": KEY,
                             "DATABASE_URL": f"sqlite:///{tmp_path / 'engine.db'}",
                             "OPENAI_BASE_URL": sim.base_url,
                             "FLOW_ENGINE_WORKERS": "2",
                             "FLOW_ENGINE_GRACEFUL_TIMEOUT": "10",
                             "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
                             **env})


@pytest.fixture
def engine(tmp_path, fresh_llm_sim):
    with start_engine(tmp_path, fresh_llm_sim) as proc:
        created = requests.post(proc.url + "/api/v1/flows", json=FLOW, headers=AUTH, timeout=10)
        assert created.status_code == 201, created.text
        yield proc


def test_run_through_gunicorn_and_llm_sim(engine, fresh_llm_sim):
    resp = requests.post(engine.url + "/api/v1/run/sim-chat", json={"input_value": "hello there"},
                         headers=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    messages = [("user", "hello there")]
    assert body["output"] == "".join(reply_tokens(messages, 24))
    assert body["usage"]["input_tokens"] == count_prompt_tokens(messages)
    assert body["usage"]["output_tokens"] == 24
    # Two workers: the other one knows the run once the batch writer has recorded it (a few
    # ms after the answer), so a GET that lands there may briefly be a 404.
    record = wait_until(lambda: (r := requests.get(f"{engine.url}/api/v1/runs/{body['run_id']}",
                                                   headers=AUTH, timeout=10)).ok and r.json(),
                        "the run recorded")
    assert record["status"] == "succeeded"


def test_engine_refuses_to_start_without_a_key(tmp_path, fresh_llm_sim):
    port = free_port()
    proc = ServerProcess([sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)],
                         port=port, ready_path="/readyz", ready_timeout=20, cwd=tmp_path,
                         env={"FLOW_ENGINE_API_KEYS": "", "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})
    with pytest.raises(Exception, match="no API key configured"):
        proc.start()


def test_tokens_stream_over_sse_while_the_llm_generates(engine, fresh_llm_sim):
    fresh_llm_sim.configure(tokens_per_s=20, reply_tokens=200)  # ~10 s of generation
    resp = requests.post(engine.url + "/api/v1/run/sim-chat?stream=true",
                         json={"input_value": "stream it"}, headers=AUTH, stream=True, timeout=30)
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    names = []
    with resp:
        for event in sseclient.SSEClient(resp.iter_content(chunk_size=None)).events():
            names.append(event.event)
            if event.event == "token":
                stats = fresh_llm_sim.stats()  # buffered, it would come after the answer
                break
    assert names[0] == "run_started" and names[-1] == "token"
    assert stats["chat_completions_completed"] == 0 and stats["tokens_sent"] < 200


def test_concurrent_requests_with_one_idempotency_key_make_one_llm_call(engine, fresh_llm_sim):
    fresh_llm_sim.configure(ttft_s=0.8)
    headers = {**AUTH, "Idempotency-Key": "order-42-summary"}
    body = {"input_value": "summarise order 42"}

    def call(_):
        return requests.post(engine.url + "/api/v1/run/sim-chat", json=body, headers=headers,
                             timeout=30)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(call, range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert len({a.json()["run_id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 3
    assert fresh_llm_sim.stats()["chat_completions_started"] == 1


def test_metrics_add_up_across_workers(engine):
    for i in range(6):
        r = requests.post(engine.url + "/api/v1/run/sim-chat", json={"input_value": f"m{i}"},
                          headers=AUTH, timeout=30)
        assert r.status_code == 200
    text = requests.get(engine.url + "/metrics", timeout=10).text
    match = re.search(
        r'^flowgate_engine_runs_total\{flow="sim-chat",status="succeeded",version="1"\} (\S+)$',
        text, re.M)
    assert match, text[:2000]
    assert float(match.group(1)) == 6.0


def test_sigterm_lets_in_flight_runs_finish(tmp_path, fresh_llm_sim):
    fresh_llm_sim.configure(ttft_s=1.5)
    proc = start_engine(tmp_path, fresh_llm_sim).start()
    try:
        assert requests.post(proc.url + "/api/v1/flows", json=FLOW, headers=AUTH,
                             timeout=10).status_code == 201
        result = {}

        def slow_run():
            r = requests.post(proc.url + "/api/v1/run/sim-chat", json={"input_value": "slow"},
                              headers=AUTH, timeout=30)
            result["status"], result["body"] = r.status_code, r.json()

        thread = threading.Thread(target=slow_run)
        thread.start()
        # in flight: SIGTERM before the engine took the request would refuse it
        wait_until(lambda: fresh_llm_sim.stats()["chat_completions_started"] >= 1,
                   what="the run at the LLM")
        proc.proc.send_signal(signal.SIGTERM)
        thread.join(20)
        assert result.get("status") == 200, result
        assert result["body"]["output"].startswith("[simulated reply]")
        assert proc.proc.wait(15) == 0
    finally:
        proc.stop()


def test_sigterm_writes_the_records_of_runs_that_already_answered(tmp_path, fresh_llm_sim):
    # Ends of runs are written in batches off the request path; with a batch wait far longer
    # than this test, only the flush at exit can write them.
    proc = start_engine(tmp_path, fresh_llm_sim, FLOW_ENGINE_RECORD_BATCH_S="600").start()
    try:
        assert requests.post(proc.url + "/api/v1/flows", json=FLOW, headers=AUTH,
                             timeout=10).status_code == 201
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: requests.post(
                proc.url + "/api/v1/run/sim-chat", json={"input_value": f"run {i}"},
                headers=AUTH, timeout=30), range(12)))
        assert [a.status_code for a in answers] == [200] * 12
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(15) == 0
    finally:
        proc.stop()
    with start_engine(tmp_path, fresh_llm_sim) as proc:
        for answer in answers:
            run = requests.get(f"{proc.url}/api/v1/runs/{answer.json()['run_id']}", headers=AUTH,
                               timeout=10).json()
            assert (run["status"], run["output"]) == ("succeeded", answer.json()["output"]), run


def test_store_survives_restart(tmp_path, fresh_llm_sim):
    with start_engine(tmp_path, fresh_llm_sim) as proc:
        requests.post(proc.url + "/api/v1/flows", json=FLOW, headers=AUTH, timeout=10)
        v2 = {**FLOW, "name": "Chat v2"}
        assert requests.put(proc.url + "/api/v1/flows/sim-chat", json=v2, headers=AUTH,
                            timeout=10).status_code == 201
        assert requests.post(proc.url + "/api/v1/flows/sim-chat/publish", json={"version": 2},
                             headers=AUTH, timeout=10).status_code == 200
    with start_engine(tmp_path, fresh_llm_sim) as proc:
        flow = requests.get(proc.url + "/api/v1/flows/sim-chat", headers=AUTH, timeout=10).json()
        assert (flow["live_version"], flow["name"]) == (2, "Chat v2")
        assert json.loads(json.dumps(flow["definition"]))["nodes"] == FLOW["nodes"]


# -- what one connection may cost (flowgate/common/gevent_worker.py ConnectionLimits) ------------

ECHO = {"id": "echo", "nodes": [{"id": "in", "type": "ChatInput"},
                                {"id": "llm", "type": "ChatModel", "params": {"provider": "echo"}},
                                {"id": "out", "type": "ChatOutput"}],
        "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}]}
LIMIT = 65_536
HEAD = ("POST /api/v1/run/echo HTTP/1.1\r\nHost: engine\r\nAuthorization: Bearer " + KEY +
        "\r\nContent-Type: application/json\r\n").encode()


@pytest.fixture
def limited(tmp_path, fresh_llm_sim):
    """``limited(**env)``: an engine of this test's own (one worker, a 64 KiB body limit)
    with the echo flow."""
    started = []

    def start(**env):
        proc = start_engine(tmp_path, fresh_llm_sim, FLOW_ENGINE_WORKERS="1",
                            FLOW_ENGINE_GRACEFUL_TIMEOUT="1",
                            FLOW_ENGINE_MAX_BODY_BYTES=str(LIMIT), **env).start()
        started.append(proc)
        assert requests.post(proc.url + "/api/v1/flows", json=ECHO, headers=AUTH,
                             timeout=10).status_code == 201
        return proc

    yield start
    for proc in started:
        proc.stop()


def raw(proc, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """Read one whole HTTP answer (and the close that follows): status and JSON body."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def closed_by_server(sock: socket.socket, trickle: bytes, within_s: float) -> bool:
    """Send ``trickle`` a byte every 0.1 s; True when the server closes the connection
    before ``within_s`` is over."""
    deadline = time.monotonic() + within_s
    sock.settimeout(0.1)
    for byte in trickle:
        if time.monotonic() > deadline:
            return False
        try:
            sock.send(bytes([byte]))
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_a_chunked_body_over_the_limit_is_413_not_its_first_part(limited):
    proc = limited()
    valid = json.dumps({"input_value": "x" * (LIMIT - 100)}).encode()
    body = valid + b" " * (LIMIT - len(valid)) + b"and then some more" * 1000  # valid up to LIMIT
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192])
                      for i in range(0, len(body), 8192))
    sock = raw(proc, HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + chunks + b"0\r\n\r\n")

    status, answer = read_answer(sock)

    assert status == 413, answer
    assert answer["error"]["code"] == "payload_too_large"


def test_a_client_sending_a_body_over_the_limit_reads_the_413(limited):
    """The engine answers 413 from Content-Length before reading the body; a client that
    sends its whole body first must still get to read that answer, not a reset."""
    proc = limited()
    body = b"x" * (4 * 1024 * 1024)
    sock = raw(proc)
    sock.sendall(HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    sock.sendall(body)  # a reset would fail this

    status, answer = read_answer(sock)

    assert status == 413
    assert answer["error"]["code"] == "payload_too_large"


def test_a_stalled_body_is_408_after_the_body_timeout(limited):
    proc = limited(FLOW_ENGINE_BODY_TIMEOUT_S="1")
    sock = raw(proc, HEAD + b'Content-Length: 100\r\n\r\n{"input_value": "')

    status, answer = read_answer(sock)  # the server closes after answering

    assert status == 408
    assert answer["error"]["code"] == "request_timeout"
    assert requests.get(proc.url + "/healthz", timeout=5).status_code == 200


def test_a_slow_request_head_is_closed_after_the_header_timeout(limited):
    proc = limited(FLOW_ENGINE_HEADER_TIMEOUT_S="1", FLOW_ENGINE_KEEPALIVE="60")
    sock = raw(proc)

    assert closed_by_server(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200,
                            within_s=10)


def test_idle_connections_over_the_worker_limit_do_not_lock_probes_out(limited):
    proc = limited(FLOW_ENGINE_WORKER_CONNECTIONS="20", FLOW_ENGINE_KEEPALIVE="60",
                   FLOW_ENGINE_HEADER_TIMEOUT_S="60")
    idle = [raw(proc) for _ in range(40)]  # twice what the worker takes, none says a word
    try:
        assert requests.get(proc.url + "/healthz", timeout=5).status_code == 200
        answer = requests.post(proc.url + "/api/v1/run/echo", json={"input_value": "hi"},
                               headers=AUTH, timeout=5)
        assert answer.status_code == 200
    finally:
        for sock in idle:
            sock.close()
