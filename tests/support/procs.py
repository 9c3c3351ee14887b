"""Start real server processes for integration tests.

Example::

    proc = start_owned(lambda port: ServerProcess(
        [sys.executable, "-m", "flowgate.llm_sim", "--port", str(port)],
        port=port, ready_path="/sim/stats"))  # started, on a port of its own
    try:
        requests.get(proc.url + "/v1/models")
    finally:
        proc.stop()

The process gets its own session (process group) so that a SIGKILL on shutdown also
reaches children such as gunicorn workers. Its stdout and stderr go to a temp file whose
tail is included in the error when the process dies or never becomes ready.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import requests

_PICKER = random.SystemRandom()  # not the random module's state, which tests may seed
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=512)
_PICKING = threading.Lock()
_BELOW_EPHEMERAL = 12_000  # how many ports under the kernel's ephemeral range to pick from


def _ephemeral_low() -> int:
    """The first port the kernel gives outgoing connections (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago. Picked below the kernel's
    ephemeral range, so none of the suite's own outgoing connections (to Redis, PostgreSQL,
    the servers) takes it before the server binds it, and not one this process handed out
    lately. Another process may still bind it first: start servers with
    :func:`start_owned`."""
    high = _ephemeral_low()
    low = high - _BELOW_EPHEMERAL
    with _PICKING:
        for _ in range(200 if low >= 10_000 else 0):  # a low ephemeral range: the OS's pick
            port = _PICKER.randrange(low, high)
            if port in _HANDED_OUT:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:  # without SO_REUSEADDR: a port with connections in TIME_WAIT is skipped
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.append(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on TCP ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def listens_on(session: int, port: int) -> bool:
    """Does a process of ``session`` (a ServerProcess's pid: it leads its own session) hold
    a socket listening on ``port``? Without /proc (not Linux), assumed so."""
    if not Path("/proc/net/tcp").exists():
        return True
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) != session:
                continue
            if any(os.readlink(fd) in targets for fd in (entry / "fd").iterdir()):
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def start_owned(make: Callable[[int], ServerProcess], port: int | None = None,
                attempts: int = 5) -> ServerProcess:
    """``make(port).start()`` on a port from free_port(), made sure to be ours: the port was
    free when free_port() looked, but another process (another test run on this machine) may
    bind it before the server does. Then the server fails to bind (gunicorn retries for
    seconds first) while its readiness check may even be answered by the other process. So
    the server counts as started only once a process of its own listens there; otherwise it
    is stopped and started again on another port. A ``port`` given (a restart on the same
    address) is not changed: taken by another process, it is an error saying so."""
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        proc = make(chosen)
        try:
            proc.start()
        except ServerNotReady as exc:
            if port is None and "in use" in str(exc) and attempt < attempts:
                continue
            raise
        assert proc.proc is not None
        if listens_on(proc.proc.pid, chosen):
            return proc
        proc.kill()
        if port is not None:
            raise AssertionError(f"port {port} is held by another process; cannot restart there")
    raise AssertionError(f"no port of our own after {attempts} attempts")


class ServerNotReady(RuntimeError):
    """The process exited, or did not answer 200 on its ready path in time."""


class ServerProcess:
    """A server process that is ready once ``GET http://127.0.0.1:{port}{ready_path}`` is 200.

    ``env`` is added to (not substituted for) the current environment.
    Use as a context manager, or call :meth:`start` and :meth:`stop` yourself.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        port: int,
        ready_path: str = "/",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready_timeout: float = 15.0,
        stop_timeout: float = 10.0,
        name: str | None = None,
        keep_log: bool = False,
    ) -> None:
        self.args = [str(a) for a in args]
        self.port = port
        self.ready_path = ready_path
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.name = name or Path(self.args[0]).name
        self.keep_log = keep_log  # otherwise the log file is deleted by stop()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        fd, path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        self.log_path = Path(path)
        with os.fdopen(fd, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerNotReady(self._describe(f"exited with code {self.proc.returncode}"))
            try:
                resp = requests.get(self.url + self.ready_path, timeout=1)
                if resp.status_code == 200:
                    return
                last_error = f"HTTP {resp.status_code}"
            except requests.RequestException as e:
                last_error = type(e).__name__
            time.sleep(0.1)
        raise ServerNotReady(self._describe(
            f"not ready after {self.ready_timeout:.0f}s (last: {last_error})"))

    def _describe(self, what: str) -> str:
        return f"{self.name} ({' '.join(self.args)}) {what}; output tail:\n{self.tail()}"

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the process's combined stdout/stderr."""
        if self.log_path is None or not self.log_path.exists():
            return "<no output captured>"
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "<empty>"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group after ``stop_timeout``.

        Returns the exit code. Idempotent.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait(5)
        self._kill_group()  # stragglers (orphaned workers) must not outlive the test run
        if self.log_path is not None and not self.keep_log:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None
        return self.proc.returncode

    def kill(self) -> None:
        """Stop without a graceful drain: SIGKILL to the whole group, then :meth:`stop`."""
        if self.proc is not None and self.proc.poll() is None:
            self._kill_group()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.stop()

    def _kill_group(self) -> None:
        assert self.proc is not None
        # start_new_session=True made the child the leader of a group whose id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
