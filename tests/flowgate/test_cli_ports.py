"""`flowgate engine` and `flowgate ambassador` on a port another process listens on say so
and exit (2) at once, instead of gunicorn retrying for seconds and failing with its own
trace (a second `make run`, or docs/design.md "The engine service" while the stack is up)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


@pytest.mark.parametrize("service", ["engine", "ambassador"])
def test_a_busy_port_is_named_and_the_command_exits(tmp_path, service) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "FLOW_ENGINE_API_KEYS": "ops:admin:secret-for-the-port-test",
               "DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}", "FLOW_ENGINE_KNOWLEDGE": "off"}
        done = subprocess.run([sys.executable, "-m", "flowgate.cli", service, "--host",
                               "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "Traceback" not in done.stderr
