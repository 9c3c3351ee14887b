"""``flowgate up``: the whole stack on one machine with embedded defaults.

Starts the LLM simulator, the engine (SQLite in ./.flowgate/) and the ambassador on
127.0.0.1:8080, pushes the demo flows from examples/, prints where everything listens and a
curl that works, and stops everything on Ctrl-C or SIGTERM. Needs no Redis, PostgreSQL or
Docker. Set OPENAI_BASE_URL (and OPENAI_API_KEY) to use a real model instead of the simulator.

Keys (:class:`StackKeys`): each ``up`` makes two fresh engine keys, as a deployment would —
``cli`` (admin), written to ``.flowgate/engine.key`` (0600) for ``flowgate flows`` and used
to push the demo flows, and ``ambassador`` (``runner+proxy``), which only the ambassador
gets: a process that holds the sidecar's key can run flows, not change them. Engine-only
secrets of the caller's environment (:data:`ENGINE_ONLY_ENV`) are not passed to the
ambassador or the simulator.
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
from dataclasses import dataclass
from pathlib import Path

STATE = Path(".flowgate")
KEY_FILE = STATE / "engine.key"  # the admin secret, for `flowgate flows` (flowgate/client.py)
# What only the engine may see; the other services start without these even when the shell
# that runs `flowgate up` has them (the ambassador gets its own runner key instead).
ENGINE_ONLY_ENV = ("FLOW_ENGINE_API_KEYS", "FLOW_ENGINE_API_KEY_FILE", "FLOWGATE_API_KEY",
                   "OPENAI_API_KEY")


@dataclass(frozen=True, repr=False)
class StackKeys:
    """The engine keys of one ``flowgate up``: ``admin`` for the CLI, ``ambassador`` for the
    sidecar. The names are what the engine logs as the actor of each request."""

    admin: str
    ambassador: str
    ADMIN_NAME = "cli"
    AMBASSADOR_NAME = "ambassador"

    @classmethod
    def generate(cls) -> StackKeys:
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24))

    def engine_keys(self) -> str:
        """``FLOW_ENGINE_API_KEYS`` for the engine (flow_engine/auth.py: name:role:secret)."""
        return (f"{self.ADMIN_NAME}:admin:{self.admin},"
                f"{self.AMBASSADOR_NAME}:runner+proxy:{self.ambassador}")

    def __repr__(self) -> str:  # never print a secret
        return f"StackKeys({self.ADMIN_NAME}: admin, {self.AMBASSADOR_NAME}: runner+proxy)"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that only its owner can ever read it: a new file created
    0600 in the same directory (never written first and chmod-ed after), then renamed over
    ``path``. The rename also means an existing file with looser permissions — or a
    reader that opened it earlier — never sees the new secret, and a symlink at ``path`` is
    replaced, not followed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
            data = text.encode("utf-8")
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def service_env(service: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of one service: the caller's, minus what only the engine may see
    (for every other service), minus an inherited metrics directory, plus ``env``."""
    inherited = {k: v for k, v in os.environ.items()
                 if service == "engine" or k not in ENGINE_ONLY_ENV}
    # each service decides its own metrics directory (never a shared inherited one)
    return {**inherited, "PROMETHEUS_MULTIPROC_DIR": "", **env}


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
        STATE.mkdir(mode=0o700, exist_ok=True)  # a new one is private: keys, logs, the database

    def start(self, name: str, args: list[str], env: dict[str, str], port: int,
              ready_path: str) -> None:
        _check_port_free(name, port)
        log = open(STATE / f"{name}.log", "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,  # noqa: S603
                                env=service_env(name, env), start_new_session=True)
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
    keys = StackKeys.generate()
    write_private(KEY_FILE, keys.admin + "\n")
    py = sys.executable
    llm_url = os.environ.get("OPENAI_BASE_URL")
    # The simulator needs no provider key: a real one exported in this shell is not sent to it.
    provider_key = {} if llm_url else {"OPENAI_API_KEY": ""}
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
                    # exactly the keys below (an inherited key file would add others)
                    {"FLOW_ENGINE_API_KEYS": keys.engine_keys(), "FLOW_ENGINE_API_KEY_FILE": "",
                     "OPENAI_BASE_URL": llm_url, **provider_key,
                     "DATABASE_URL": os.environ.get("DATABASE_URL",
                                                    f"sqlite:///{(STATE / 'flowgate.db').resolve()}")},
                    args.engine_port, "/readyz")
        config = os.environ.get("AMBASSADOR_CONFIG") or str(_demo_ambassador_config())
        stack.start("ambassador", [py, "-m", "flowgate.cli", "ambassador",
                                   "--port", str(args.ambassador_port)],
                    {"AMBASSADOR_UPSTREAM_URL": f"http://127.0.0.1:{args.engine_port}",
                     "AMBASSADOR_UPSTREAM_KEY": keys.ambassador, "AMBASSADOR_CONFIG": config},
                    args.ambassador_port, "/readyz")
        _demo_knowledge(args.examples, args.engine_port, keys.admin, simulated=not os.environ.get(
            "OPENAI_BASE_URL"))
        flows = _push_examples(args.examples, args.engine_port, keys.admin)
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


def _demo_knowledge(examples: Path, engine_port: int, key: str, *, simulated: bool) -> None:
    """The ``handbook`` knowledge base of the handbook-qa flow, from ``examples/handbook/``
    (beside the flows pushed, else the package's own examples): created if missing, changed
    files uploaded, indexed before the flows are pushed (a flow naming a base that does not
    exist is invalid). A real provider gets OpenAI's small embedding model."""
    from flowgate import knowledge_cli
    from flowgate.client import ApiError, EngineClient

    folder = examples / "handbook"
    if not folder.is_dir():
        folder = examples_dir() / "handbook"
    if not folder.is_dir():
        return
    model = knowledge_cli.SIM_MODEL if simulated else knowledge_cli.DEFAULT_MODEL
    try:
        knowledge_cli.ensure_demo(EngineClient(f"http://127.0.0.1:{engine_port}", key), folder,
                                  model=model, dimensions=256 if simulated else None)
    except ApiError as exc:
        print(f"flowgate up: the demo knowledge base was not set up: {exc.code}: {exc.message}",
              file=sys.stderr)


def _same(stored, definition) -> bool:
    if not stored:
        return False
    keys = ("nodes", "edges", "name", "description")
    return all(stored.get(k) == definition.get(k) for k in keys if k in definition)


def _banner(args, llm_url: str, flows: list[str], config: str) -> None:
    amb = f"http://127.0.0.1:{args.ambassador_port}"
    flow = "faq-rag" if "faq-rag" in flows else (flows[0] if flows else "FLOW")
    cli, sidecar = StackKeys.ADMIN_NAME, StackKeys.AMBASSADOR_NAME  # names only, never secrets
    print(f"""
Flowgate is up.
  ambassador  {amb}            (apps call this: POST /run-flow)
  engine      http://127.0.0.1:{args.engine_port}
  console     http://127.0.0.1:{args.engine_port}/ui/   (sign in with the key in {KEY_FILE})
  keys        {cli:<11} admin: in {KEY_FILE}, what `flowgate flows ...` uses
              {sidecar:<11} runner+proxy: the ambassador's only (runs flows, cannot change them)
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
            said = _last_line(STATE / f"{name}.log")
            raise RuntimeError(f"the {name} exited with {proc.returncode}"
                               f"{f': {said}' if said else ''}; see {STATE}/{name}.log")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the {name} was not ready after {timeout_s:.0f} s; see {STATE}/{name}.log")


def _last_line(log: Path) -> str:
    """The last line a service wrote (why it refused to start, e.g. an unsafe setting)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip()[:500] if lines else ""
