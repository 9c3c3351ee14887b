"""Shared pieces of the bench scripts: processes, HTTP timing, wrk, RSS, percentiles.

Benchmarks print ratios of things measured side by side in one run (the machine is shared
and noisy); the last line of each script is one JSON object.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> float:
    """Seconds until ``GET path`` answers 200 (bounded)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it was ready")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"not ready on :{port}{path} after {timeout_s} s")


@contextmanager
def server(args: list[str], port: int, ready_path: str, env: dict[str, str] | None = None):
    """Start a server process group; yield ``(proc, ready_seconds)``; stop it afterwards."""
    log = tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log", delete=False)
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})}, cwd=tempfile.mkdtemp())
    try:
        wait_ready(port, ready_path, proc)
        yield proc, time.monotonic() - started
    except BaseException:
        log.flush()
        sys.stderr.write(Path(log.name).read_text()[-3000:])
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except ProcessLookupError:
            pass  # already gone (it may have died before it was ready)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        Path(log.name).unlink(missing_ok=True)


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


class Client:
    """A keep-alive HTTP/1.1 client for sequential latency measurement."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        self.conn.request("POST", path, body=json.dumps(body), headers=self.headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path, headers=self.headers)
        response = self.conn.getresponse()
        return response.status, response.read()


def timed_ms(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def blocks_ms(calls: dict[str, Callable[[], object]], rounds: int, per_round: int,
              block: int = 20) -> dict[str, list[list[float]]]:
    """Each path's latencies by round, the paths taking turns in blocks of ``block`` calls
    (the order reversed every other block): a noisy minute hits every path alike, and each
    round's figures compare paths measured seconds apart, never minutes."""
    out: dict[str, list[list[float]]] = {name: [] for name in calls}
    names = list(calls)
    for _ in range(rounds):
        for name in names:
            out[name].append([])
        done = 0
        flip = False
        while done < per_round:
            n = min(block, per_round - done)
            for name in (names[::-1] if flip else names):
                out[name][-1] += timed_ms(calls[name], n)
            done += n
            flip = not flip
    return out


def median_of_rounds(a: list[list[float]], b: list[list[float]], *, ratio: bool) -> float:
    """The median over rounds of p50(a) / p50(b) (``ratio``) or p50(a) − p50(b): one bad
    round moves it less than pooling every round's samples does."""
    per_round = [statistics.median(x) / statistics.median(y) if ratio
                 else statistics.median(x) - statistics.median(y) for x, y in zip(a, b, strict=True)]
    return statistics.median(per_round)


def calibration_ms(repeat: int = 7) -> float:
    """A fixed pure-Python loop's median time in this process: printed with every run, so
    runs on a busier (or another) machine can be told apart from a real change."""
    def loop() -> int:
        total = 0
        for i in range(200_000):
            total += i * i % 7
        return total

    return statistics.median(timed_ms(loop, repeat))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


FRESH = "<fresh>"  # a header value wrk() replaces with a new one on every request


def wrk(url: str, body: dict, headers: dict[str, str], *, connections: int, seconds: float,
        threads: int = 2) -> dict:
    """Run wrk (Debian package ``wrk``) with a POST body; requests/s, latency, errors. A
    header whose value is ``FRESH`` gets a value of its own on every request (an
    Idempotency-Key: unique per wrk thread, run and request)."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    fresh = [name for name, value in headers.items() if value == FRESH]
    for name, value in {"Content-Type": "application/json", **headers}.items():
        if value != FRESH:
            lines.append(f'wrk.headers["{name}"] = "{value}"')
    if fresh:
        lines.append(f"""local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("prefix", "{uuid.uuid4().hex}-" .. threads .. "-")
end
local n = 0
request = function()
  n = n + 1
  for _, name in ipairs({{{", ".join(json.dumps(h) for h in fresh)}}}) do
    wrk.headers[name] = prefix .. n
  end
  return wrk.format()
end""")
    lines.append("""done = function(summary, latency, requests)
  io.write(string.format("JSON %d %d %d %d %f %f %f\\n", summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write, summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.duration / 1e6))
end""")
    script.write("\n".join(lines))
    script.close()
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
         "-s", script.name, url], capture_output=True, text=True, timeout=seconds + 60, check=True)
    Path(script.name).unlink()
    fields = next(ln for ln in out.stdout.splitlines() if ln.startswith("JSON ")).split()[1:]
    requests_, status_err, sock_err, timeouts = map(int, fields[:4])
    p50, p99, duration = map(float, fields[4:])
    return {"requests": requests_, "non_2xx": status_err, "socket_errors": sock_err,
            "timeouts": timeouts, "rps": requests_ / duration, "p50_ms": p50, "p99_ms": p99}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children: a gunicorn master and its workers."""
    return [pid, *children(pid)]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds that ``pids`` have used so far (``/proc/<pid>/stat``);
    a process that has gone away counts 0."""
    ticks = 0
    for pid in pids:
        try:
            # comm (field 2) may hold spaces; utime and stime are fields 14 and 15
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
