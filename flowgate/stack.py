"""``flowgate up``: the whole stack on one machine with embedded defaults.

Starts the LLM simulator, the engine (SQLite in ./.flowgate/, a fresh API key) and the
ambassador on 127.0.0.1:8080, pushes the demo flows from examples/, prints where everything
listens and a curl that works, and stops everything on Ctrl-C or SIGTERM. Needs no Redis,
PostgreSQL or Docker. Set OPENAI_BASE_URL (and OPENAI_API_KEY) to use a real model instead
of the simulator.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

STATE = Path(".flowgate")


def examples_dir() -> Path:
    """Where the demo flows are: ``$FLOWGATE_EXAMPLES``; else ``examples/`` beside the
    package (a checkout or an editable install); else ``./examples`` (the Docker image's
    working directory holds them; an installed wheel does not)."""
    if os.environ.get("FLOWGATE_EXAMPLES"):
        return Path(os.environ["FLOWGATE_EXAMPLES"])
    beside = Path(__file__).resolve().parent.parent / "examples"
    return beside if beside.is_dir() else Path.cwd() / "examples"


def add_arguments(up: argparse.ArgumentParser) -> None:
    up.add_argument("--ambassador-port", type=int, default=8080)
    up.add_argument("--engine-port", type=int, default=8000)
    up.add_argument("--llm-port", type=int, default=9100)
    up.add_argument("--examples", type=Path, default=examples_dir(),
                    help="flows to push at start (default: %(default)s)")
    up.add_argument("--tps", type=float, default=40.0, help="simulated LLM tokens per second")


class Stack:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        STATE.mkdir(exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str], port: int,
              ready_path: str) -> None:
        _check_port_free(name, port)
        log = open(STATE / f"{name}.log", "ab")
        # each service decides its own metrics directory (never a shared inherited one)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": "", **env}
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                env=env, start_new_session=True)
        self.procs.append((name, proc))
        _wait_ready(name, f"http://127.0.0.1:{port}{ready_path}", proc)

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 35
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def up(args: argparse.Namespace) -> int:
    stack = Stack()
    key = secrets.token_urlsafe(24)
    key_file = STATE / "engine.key"
    key_file.write_text(key + "\n", encoding="utf-8")
    key_file.chmod(0o600)
    py = sys.executable
    llm_url = os.environ.get("OPENAI_BASE_URL")
    stopping = False

    def on_term(_sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        if not llm_url:
            stack.start("llm-sim", [py, "-m", "flowgate.llm_sim", "--port", str(args.llm_port),
                                    "--ttft", "0.2", "--tps", str(args.tps), "--reply-tokens", "40"],
                        {}, args.llm_port, "/v1/models")
            llm_url = f"http://127.0.0.1:{args.llm_port}/v1"
        stack.start("engine", [py, "-m", "flowgate.cli", "engine", "--port", str(args.engine_port)],
                    {"FLOW_ENGINE_API_KEYS": key, "OPENAI_BASE_URL": llm_url,
                     "DATABASE_URL": os.environ.get("DATABASE_URL",
                                                    f"sqlite:///{(STATE / 'flowgate.db').resolve()}")},
                    args.engine_port, "/readyz")
        config = os.environ.get("AMBASSADOR_CONFIG") or str(_demo_ambassador_config())
        stack.start("ambassador", [py, "-m", "flowgate.cli", "ambassador",
                                   "--port", str(args.ambassador_port)],
                    {"AMBASSADOR_UPSTREAM_URL": f"http://127.0.0.1:{args.engine_port}",
                     "AMBASSADOR_UPSTREAM_KEY": key, "AMBASSADOR_CONFIG": config},
                    args.ambassador_port, "/readyz")
        flows = _push_examples(args.examples, args.engine_port, key)
        _banner(args, llm_url, flows, config)
        while all(proc.poll() is None for _name, proc in stack.procs):
            time.sleep(0.5)
        dead = [name for name, proc in stack.procs if proc.poll() is not None]
        print(f"flowgate up: {', '.join(dead)} exited; see {STATE}/*.log. Stopping.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        stopping = True
        print("\nstopping…", file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"flowgate up: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        if stopping:
            print("stopped.", file=sys.stderr)


DEMO_AMBASSADOR_CONFIG = """\
# Written by `flowgate up` (set AMBASSADOR_CONFIG to use your own). Edits apply without a
# restart. The format is in ambassador/config.py.
inbound_auth: {mode: none}          # loopback only
flows:
  faq-rag:
    cache: {ttl_s: 60, stale_if_error_s: 3600}
    fallback: {output: "The FAQ assistant is unavailable right now; please try again soon."}
  support-router:
    ratelimit: {requests_per_s: 20, burst: 40}
"""


def _demo_ambassador_config() -> Path:
    path = STATE / "ambassador.yaml"
    if not path.exists():
        path.write_text(DEMO_AMBASSADOR_CONFIG, encoding="utf-8")
    return path.resolve()


def _push_examples(folder: Path, engine_port: int, key: str) -> list[str]:
    from flowgate.client import ApiError, EngineClient
    from flowgate.flows_cli import load_json

    client = EngineClient(f"http://127.0.0.1:{engine_port}", key)
    pushed = []
    if not folder.is_dir():
        print(f"flowgate up: no demo flows pushed: {folder} is not a directory (pass --examples "
              "DIR or set FLOWGATE_EXAMPLES)", file=sys.stderr)
    for path in sorted(folder.glob("*.json")):
        definition = load_json(path)
        try:
            current = client.call("GET", f"/flows/{definition['id']}")
            if _same(current.get("definition"), definition):
                pushed.append(definition["id"])
                continue
        except ApiError as exc:
            if exc.status != 404:
                raise
        flow_id, _version, _created = client.push(definition, publish=True)
        pushed.append(flow_id)
    return pushed


def _same(stored, definition) -> bool:
    if not stored:
        return False
    keys = ("nodes", "edges", "name", "description")
    return all(stored.get(k) == definition.get(k) for k in keys if k in definition)


def _banner(args, llm_url: str, flows: list[str], config: str) -> None:
    amb = f"http://127.0.0.1:{args.ambassador_port}"
    flow = "faq-rag" if "faq-rag" in flows else (flows[0] if flows else "FLOW")
    print(f"""
Flowgate is up.
  ambassador  {amb}            (apps call this: POST /run-flow)
  engine      http://127.0.0.1:{args.engine_port}   (key in {STATE}/engine.key)
  llm         {llm_url}
  flows       {', '.join(flows) or 'none'}
  logs        {STATE}/*.log
  config      {config} (the ambassador's; edits apply live)

Try:
  curl -s {amb}/run-flow -H 'Content-Type: application/json' \\
       -d '{{"flow_id": "{flow}", "input": "How long do refunds take?"}}'
  curl -sN {amb}/run-flow -H 'Content-Type: application/json' \\
       -d '{{"flow_id": "{flow}", "input": "Is shipping free?", "stream": true}}'

Ctrl-C stops everything.""", flush=True)


def _check_port_free(name: str, port: int) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} for the {name} is already in use; "
                               f"pass --{name.replace('-sim', '')}-port")


def _wait_ready(name: str, url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {name} exited with {proc.returncode}; see {STATE}/{name}.log")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the {name} was not ready after {timeout_s:.0f} s; see {STATE}/{name}.log")
