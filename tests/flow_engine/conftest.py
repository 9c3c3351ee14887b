"""A Redis server of the test's own (``private_redis``), for tests that make Redis fail: hang
it (SIGSTOP), stop it, start it again. The shared test Redis is never touched, so other
tests running at the same time are not disturbed.

It runs with an append-only file fsynced on every write, so a restart keeps what was
written (as a Redis with persistence does); ``redis-server`` must be installed (skipped
locally without it, a failure under CI).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support.needs import missing
from support.procs import free_port

WAIT_S = 10.0


class PrivateRedis:
    """A ``redis-server`` process on a free port (see the module docstring)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                assert self.proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not answer in time"
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        """Kill it (SIGKILL): connections are refused until ``start()``."""
        if self.proc is not None:
            self.resume()
            self.proc.kill()
            self.proc.wait(WAIT_S)
            self.proc = None

    def hang(self) -> None:
        """SIGSTOP: connections are accepted but nothing is ever answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_connect_timeout=2,
                                    socket_timeout=5)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        missing("redis-server is not installed (apt-get install redis-server)")
    server = PrivateRedis(tmp_path).start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
