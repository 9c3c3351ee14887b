"""Streaming: time to first token through the engine versus straight from llm-sim, and many
concurrent streamed runs against a slow LLM.

    .venv/bin/python bench/stream.py [--rounds 200] [--concurrent 200] [--redis]
                                     [--sim-ttft 0.05] [--sim-tps 0]

1. Time to first token, in interleaved rounds on keep-alive connections: (a) llm-sim's
   ``POST /v1/chat/completions`` with ``stream: true`` and the messages the engine sends, to
   the first chunk with content; (b) the engine's ``POST /api/v1/run/{flow}?stream=true``
   (ChatInput → ChatModel(openai, same llm-sim) → ChatOutput) to the first ``event: token``
   frame. llm-sim waits a fixed ttft (--sim-ttft, 0.05 s) before its first token, so what
   the engine adds shows against a known floor; by default it then sends the whole reply at
   once (--sim-tps 0), as a fast provider or a buffering proxy does.
2. --concurrent streamed runs at once against a slow llm-sim (reconfigured to ttft 1 s and
   50 tokens at 50/s: ideally 2 s per stream and 2 s in all), each read to the end and
   checked (50 token events, last event run_finished); the same number of streams straight
   from llm-sim first, as the reference. Engine worker CPU time and RSS before and after.

Both clients are raw sockets speaking HTTP/1.1 (one selector loop for the concurrent
streams), and every frame is stamped with the time its bytes were received, before any
parsing, so the client costs both sides the same few microseconds.

The engine runs with its default worker count (1 without REDIS_URL); --redis runs it with
REDIS_URL=redis://127.0.0.1:6379/0 and 2 workers. Last line: one JSON object
(``ttft_added_p50_ms`` is engine p50 − direct p50, target ≤ 5 ms; ``streams_failed``
target 0).
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support import Client, children, cpu_seconds, free_port, pct, rss_mb, server

KEY = "bench-key"
MODEL = "flowgate-sim"
QUESTION = "how long until I get my refund?"
FLOW = {
    "id": "bench-stream", "name": "bench stream",
    "nodes": [
        {"id": "in", "type": "ChatInput"},
        {"id": "llm", "type": "ChatModel",
         "params": {"provider": "openai", "model": MODEL, "max_retries": 0}},
        {"id": "out", "type": "ChatOutput"},
    ],
    "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}],
}
# What the engine's openai provider (OpenAICompatChatModel) posts for this flow.
SIM_BODY = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": QUESTION}],
            "stream_options": {"include_usage": True}}
RUN_BODY = {"input_value": QUESTION}
SLOW = {"ttft_s": 1.0, "tokens_per_s": 50.0, "reply_tokens": 50}
REDIS_URL = "redis://127.0.0.1:6379/0"


def http_request(port: int, path: str, body: dict, headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one HTTP/1.1 POST with a JSON body (built once, sent many times)."""
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             "Accept: text/event-stream", f"Content-Length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


class SSEResponse:
    """Incremental parser of one HTTP/1.1 response carrying Server-Sent Events: ``feed`` it
    bytes as they arrive, get back the SSE frames they complete. Handles chunked and
    Content-Length bodies (an error answer is JSON with a length)."""

    def __init__(self) -> None:
        self.status = 0
        self.keep_alive = True
        self.done = False
        self.error_body = b""
        self._buf = b""
        self._head = True
        self._chunked = False
        self._remaining = 0
        self._sse = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if self._head and not self._read_head():
            return []
        body = self._read_chunks() if self._chunked else self._read_length()
        if self.status != 200:
            self.error_body += body
            return []
        frames = (self._sse + body).split(b"\n\n")
        self._sse = frames.pop()
        return [f for f in frames if f]

    def _read_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self._buf[:end].decode("latin-1").split("\r\n")
        self._buf = self._buf[end + 4:]
        self.status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self._chunked = "chunked" in headers.get("transfer-encoding", "")
        self._remaining = int(headers.get("content-length", "0"))
        self.keep_alive = headers.get("connection") != "close"
        self._head = False
        return True

    def _read_chunks(self) -> bytes:
        out = []
        while (line_end := self._buf.find(b"\r\n")) >= 0:
            size = int(self._buf[:line_end].split(b";")[0], 16)
            end = line_end + 2 + size + 2  # the size line, the data, its CRLF
            if len(self._buf) < end:
                break
            out.append(self._buf[line_end + 2:end - 2])
            self._buf = self._buf[end:]
            if size == 0:  # the last chunk (no trailers)
                self.done = True
                break
        return b"".join(out)

    def _read_length(self) -> bytes:
        body, self._buf = self._buf[:self._remaining], self._buf[self._remaining:]
        self._remaining -= len(body)
        self.done = self._remaining == 0
        return body


def engine_kind(frame: bytes) -> str:
    """The ``event:`` of an engine SSE frame ("token", "run_finished", …)."""
    i = frame.find(b"event: ")
    if i < 0:
        return "comment"
    j = frame.find(b"\n", i)
    return frame[i + 7:j if j >= 0 else len(frame)].decode()


def sim_kind(frame: bytes) -> str:
    """What an llm-sim SSE frame is: "token" (a chunk with content), "done" or "chunk"."""
    if frame == b"data: [DONE]":
        return "done"
    if b'"content":"' in frame and b'"content":""' not in frame:
        return "token"
    return "chunk"


@dataclass
class Target:
    """Where streams go and what a complete one looks like."""

    name: str
    port: int
    request: bytes
    kind: Callable[[bytes], str]
    last_event: str  # the kind of the last frame of a complete stream


@dataclass
class Stream:
    """One streamed answer, times in perf_counter seconds."""

    start: float
    first_token: float | None = None
    end: float | None = None
    status: int = 0
    tokens: int = 0
    last: str = ""
    error: str = ""
    last_frame: bytes = b""  # the last frame itself: an error frame says why

    def ok(self, target: Target, tokens: int) -> bool:
        return (not self.error and self.status == 200 and self.end is not None
                and self.tokens == tokens and self.last == target.last_event)

    def why(self, target: Target, tokens: int) -> str:
        return self.error or (f"status {self.status}, {self.tokens}/{tokens} tokens, "
                              f"last frame {self.last!r} (want {target.last_event!r})"
                              + (f": {self.last_frame[:160]!r}" if self.last == "error" else ""))


def _consume(stream: Stream, response: SSEResponse, target: Target, data: bytes, t: float) -> None:
    for frame in response.feed(data):
        kind = target.kind(frame)
        if kind == "token":
            stream.tokens += 1
            if stream.first_token is None:
                stream.first_token = t
        stream.last, stream.last_frame = kind, frame
    if response.done:
        stream.end, stream.status = t, response.status
        if response.status != 200:
            stream.error = f"HTTP {response.status}: {response.error_body[:200]!r}"


class KeepAliveStreams:
    """Sequential streamed POSTs to one target over one keep-alive connection."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.target.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def once(self) -> Stream:
        for attempt in (1, 2):  # a second try only if an idle connection was closed under us
            if self.sock is None:
                self.sock = self._connect()
            stream, response = Stream(time.perf_counter()), SSEResponse()
            try:
                self.sock.sendall(self.target.request)
                while not response.done:
                    data = self.sock.recv(65536)
                    t = time.perf_counter()
                    if not data:
                        break
                    _consume(stream, response, self.target, data, t)
            except OSError as exc:
                stream.error = f"{type(exc).__name__}: {exc}"
            if response.done:
                if not response.keep_alive:
                    self.close()
                return stream
            self.close()
            if response.status or attempt == 2:
                stream.error = stream.error or "connection closed mid-answer"
                return stream
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def concurrent_streams(target: Target, n: int, timeout_s: float) -> list[Stream]:
    """``n`` streams at once, one connection each, all read by one selector loop."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(sock)
    selector = selectors.DefaultSelector()
    streams = []
    for sock in socks:
        stream = Stream(time.perf_counter())
        sock.sendall(target.request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, (stream, SSEResponse()))
        streams.append(stream)
    deadline = time.perf_counter() + timeout_s
    try:
        while selector.get_map() and (left := deadline - time.perf_counter()) > 0:
            for key, _ in selector.select(timeout=min(left, 1.0)):
                stream, response = key.data
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data, stream.error = b"", f"{type(exc).__name__}: {exc}"
                t = time.perf_counter()
                if data:
                    _consume(stream, response, target, data, t)
                elif not stream.error:
                    stream.error = "connection closed mid-answer"
                if response.done or not data:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
        for key in list(selector.get_map().values()):
            key.data[0].error = f"not finished after {timeout_s:.0f} s"
            key.fileobj.close()
    finally:
        selector.close()
    return streams


def summarize(target: Target, streams: list[Stream], tokens: int) -> dict:
    ok = [s for s in streams if s.ok(target, tokens)]
    failed = [s for s in streams if not s.ok(target, tokens)]
    ends = [s.end for s in streams if s.end is not None]
    out = {"ok": len(ok), "failed": len(failed),
           "wall_s": (max(ends) - min(s.start for s in streams)) if ends else float("nan"),
           "reasons": sorted({s.why(target, tokens) for s in failed})[:3]}
    totals = [s.end - s.start for s in ok]
    ttfts = [s.first_token - s.start for s in ok]
    for name, values in (("total", totals), ("ttft", ttfts)):
        out[f"{name}_p50_s"] = statistics.median(values) if values else float("nan")
        out[f"{name}_p99_s"] = pct(values, 99) if values else float("nan")
    return out


def ttft_ms(streams: KeepAliveStreams) -> float:
    stream = streams.once()
    if stream.error or stream.first_token is None:
        raise RuntimeError(f"{streams.target.name}: {stream.why(streams.target, stream.tokens)}")
    return (stream.first_token - stream.start) * 1000


def worker_rss(master_pid: int) -> list[float]:
    return [round(rss_mb(pid), 1) for pid in children(master_pid)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="interleaved TTFT rounds")
    parser.add_argument("--concurrent", type=int, default=200, help="streams at once")
    parser.add_argument("--redis", action="store_true",
                        help=f"run the engine with REDIS_URL={REDIS_URL} and 2 workers")
    parser.add_argument("--sim-ttft", type=float, default=0.05, help="llm-sim ttft in part 1 (s)")
    parser.add_argument("--sim-tps", type=float, default=0.0,
                        help="llm-sim tokens/s in part 1 (default 0: the whole reply at once)")
    args = parser.parse_args()
    python = sys.executable
    sim_port, engine_port = free_port(), free_port()
    tmp = tempfile.TemporaryDirectory(prefix="bench-stream-")
    env = {
        "FLOW_ENGINE_API_KEYS": KEY,
        "DATABASE_URL": f"sqlite:///{Path(tmp.name) / 'bench.db'}",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "OPENAI_API_KEY": "bench-no-key",
        "PROMETHEUS_MULTIPROC_DIR": str(Path(tmp.name) / "metrics"),
        "FLOW_ENGINE_GRACEFUL_TIMEOUT": "5",
        # Empty = unset for the engine: its defaults, whatever this shell exports.
        "REDIS_URL": REDIS_URL if args.redis else "",
        "FLOW_ENGINE_WORKERS": "2" if args.redis else "",
    }
    sim_cmd = [python, "-m", "flowgate.llm_sim", "--port", str(sim_port), "--ttft", str(args.sim_ttft),
               "--tps", str(args.sim_tps)]
    engine_cmd = [python, "-m", "flowgate.cli", "engine", "--port", str(engine_port)]
    auth = {"Authorization": f"Bearer {KEY}"}
    direct = Target("direct llm-sim", sim_port,
                    http_request(sim_port, "/v1/chat/completions", SIM_BODY, auth), sim_kind, "done")
    through = Target("engine SSE", engine_port,
                     http_request(engine_port, f"/api/v1/run/{FLOW['id']}?stream=true", RUN_BODY, auth),
                     engine_kind, "run_finished")

    with tmp, server(sim_cmd, sim_port, "/v1/models") as (_sim_proc, _), \
            server(engine_cmd, engine_port, "/readyz", env) as (engine_proc, _):
        # A fresh connection per control call: servers close idle keep-alives after 5 s.
        status, text = Client(engine_port, auth).post("/api/v1/flows", FLOW)
        assert status == 201, text
        sim_tokens = json.loads(Client(sim_port).get("/sim/config")[1])["reply_tokens"]
        workers = len(children(engine_proc.pid))

        # Warm up: every worker compiles the flow and opens its pool to llm-sim.
        for target in (direct, through):
            warm = summarize(target, concurrent_streams(target, 8 * workers, 30), sim_tokens)
            if warm["failed"]:
                raise RuntimeError(f"warm-up of {target.name} failed: {warm['reasons']}")
        seq = {t.name: KeepAliveStreams(t) for t in (direct, through)}
        for _ in range(20):
            for name in seq:
                ttft_ms(seq[name])

        # 1. TTFT, interleaved; the order alternates so neither side always goes first.
        lat: dict[str, list[float]] = {name: [] for name in seq}
        for i in range(args.rounds):
            for name in (list(seq) if i % 2 == 0 else list(seq)[::-1]):
                lat[name].append(ttft_ms(seq[name]))
        for streams in seq.values():
            streams.close()

        # 2. Many streams at once against a slow LLM.
        status, text = Client(sim_port).post("/sim/config", SLOW)
        assert status == 200, text
        timeout_s = 30 + args.concurrent * 0.2
        ref = summarize(direct, concurrent_streams(direct, args.concurrent, timeout_s),
                        SLOW["reply_tokens"])
        rss_before, pids = worker_rss(engine_proc.pid), children(engine_proc.pid)
        cpu_before = cpu_seconds(pids)
        eng = summarize(through, concurrent_streams(through, args.concurrent, timeout_s),
                        SLOW["reply_tokens"])
        engine_cpu = cpu_seconds(pids) - cpu_before
        rss_after = worker_rss(engine_proc.pid)
        sim_stats = json.loads(Client(sim_port).get("/sim/stats")[1])

    d50, d90 = statistics.median(lat[direct.name]), pct(lat[direct.name], 90)
    e50, e90 = statistics.median(lat[through.name]), pct(lat[through.name], 90)
    ideal = SLOW["ttft_s"] + SLOW["reply_tokens"] / SLOW["tokens_per_s"]
    mode = f"REDIS_URL, {workers} workers" if args.redis else f"no Redis, {workers} worker(s)"
    print(f"engine: {mode}")
    pace = f"then {args.sim_tps:g} tokens/s" if args.sim_tps else "then the rest at once"
    title = (f"time to first token, {args.rounds} interleaved rounds "
             f"(llm-sim ttft {args.sim_ttft * 1000:.0f} ms, {pace})")
    print(f"{title:<64}  p50 ms    p90 ms")
    print(f"  {direct.name:<62}{d50:>8.2f}{d90:>10.2f}")
    print(f"  {through.name:<62}{e50:>8.2f}{e90:>10.2f}")
    print(f"  {'added by the engine (p50)':<62}{e50 - d50:>8.2f}   (target ≤ 5 ms)")
    print(f"{args.concurrent} concurrent streams (llm-sim ttft {SLOW['ttft_s']:.0f} s, "
          f"{SLOW['reply_tokens']} tokens at {SLOW['tokens_per_s']:.0f}/s: ideal {ideal:.1f} s)")
    print(f"  {'':<16}{'ok':>5}{'failed':>8}{'wall s':>9}{'total p50/p99 s':>19}{'ttft p50/p99 s':>18}")
    for name, r in ((direct.name, ref), (through.name, eng)):
        print(f"  {name:<16}{r['ok']:>5}{r['failed']:>8}{r['wall_s']:>9.2f}"
              f"{r['total_p50_s']:>10.2f} /{r['total_p99_s']:>6.2f}"
              f"{r['ttft_p50_s']:>10.2f} /{r['ttft_p99_s']:>5.2f}")
        for reason in r["reasons"]:
            print(f"    failed: {reason}")
    tokens = args.concurrent * SLOW["reply_tokens"]
    print(f"  engine workers: CPU {engine_cpu:.2f} s for {tokens} tokens "
          f"({engine_cpu / tokens * 1e6:.0f} µs per token); RSS MB before {rss_before}, "
          f"after {rss_after}")
    print(f"  llm-sim: {sim_stats['chat_completions_completed']} completions, "
          f"{sim_stats['streams_closed_early']} streams closed early")
    print(json.dumps({
        "ttft_added_p50_ms": round(e50 - d50, 3),
        "direct_ttft_p50_ms": round(d50, 3), "direct_ttft_p90_ms": round(d90, 3),
        "engine_ttft_p50_ms": round(e50, 3), "engine_ttft_p90_ms": round(e90, 3),
        "rounds": args.rounds, "sim_ttft_ms": round(args.sim_ttft * 1000, 1),
        "sim_tps": args.sim_tps,
        "concurrent": args.concurrent, "streams_ok": eng["ok"], "streams_failed": eng["failed"],
        "wall_s": round(eng["wall_s"], 3), "ideal_wall_s": ideal,
        "stream_total_p50_s": round(eng["total_p50_s"], 3),
        "stream_total_p99_s": round(eng["total_p99_s"], 3),
        "stream_ttft_p50_s": round(eng["ttft_p50_s"], 3),
        "stream_ttft_p99_s": round(eng["ttft_p99_s"], 3),
        "direct_streams_ok": ref["ok"], "direct_wall_s": round(ref["wall_s"], 3),
        "direct_total_p99_s": round(ref["total_p99_s"], 3),
        "rss_mb_per_worker_before": max(rss_before, default=0.0),
        "rss_mb_per_worker_after": max(rss_after, default=0.0),
        "engine_cpu_s": round(engine_cpu, 2), "engine_cpu_us_per_token": round(engine_cpu / tokens * 1e6),
        "workers": workers, "redis": args.redis,
        "sim_streams_closed_early": sim_stats["streams_closed_early"],
    }))


if __name__ == "__main__":
    main()
