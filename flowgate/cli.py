"""The ``flowgate`` command.

    flowgate up                                   llm-sim + engine + ambassador + demo flows
    flowgate engine [--port 8000]                 the flow engine under gunicorn
    flowgate ambassador [--port 8080]             the ambassador sidecar under gunicorn
    flowgate llm-sim [--port 9100 ...]            the OpenAI-compatible LLM simulator
    flowgate flows push|apply|export|list|versions|publish|rollback|run|validate   (flows_cli.py)
    flowgate flows history ID | diff ID A B       who changed a flow and why; what changed
    flowgate flows import FILE.json [--publish]   a LangFlow export as a flow (import_cli.py)
    flowgate components [TYPE] [--offline]        node types, or one type's params
    flowgate knowledge create|upload|list|search  knowledge bases (knowledge_cli.py)
    flowgate demo [--flow FILE] [--input TEXT]    run a flow in-process, streaming its events

Exit codes: 0 success, 1 the flow is invalid or the run failed, 2 bad usage or unreadable
input, 3 the engine is unreachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from flowgate import (
    canary_cli,
    components_cli,
    flows_cli,
    history_cli,
    import_cli,
    knowledge_cli,
    stack,
)

DEMO_QUESTION = "How long does it take to get a refund?"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["llm-sim"]:  # its own argparse, so `flowgate llm-sim --help` is complete
        from flowgate import llm_sim

        llm_sim.main(argv[1:])
        return 0
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        if args.handler.__module__ in (flows_cli.__name__, components_cli.__name__,
                                       knowledge_cli.__name__, import_cli.__name__,
                                       history_cli.__name__, canary_cli.__name__):
            return flows_cli.dispatch(args)
        return args.handler(args)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowgate", description="Run LLM flows for microservices.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run an example flow against the LLM simulator, streaming")
    demo.add_argument("--flow", type=Path, default=stack.examples_dir() / "faq-rag.json",
                      help="flow file (default: %(default)s)")
    demo.add_argument("--input", default=DEMO_QUESTION, help="the user's message")
    demo.add_argument("--tps", type=float, default=40.0, help="simulated tokens per second")
    demo.set_defaults(handler=_demo)

    sub.add_parser("llm-sim", help="serve the OpenAI-compatible LLM simulator (see --help)")

    eng = sub.add_parser("engine", help="serve the flow engine under gunicorn (gevent workers)")
    eng.add_argument("--host", default="127.0.0.1")
    eng.add_argument("--port", type=int, default=8000)
    eng.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: FLOW_ENGINE_WORKERS, else 2 with REDIS_URL, else 1)")
    eng.add_argument("--insecure-no-auth", action="store_true",
                     help="accept requests without an API key (local development only)")
    eng.set_defaults(handler=_engine)

    amb = sub.add_parser("ambassador", help="serve the ambassador sidecar under gunicorn")
    amb.add_argument("--host", default="127.0.0.1")
    amb.add_argument("--port", type=int, default=8080)
    amb.add_argument("--config", help="YAML config (default: AMBASSADOR_CONFIG)")
    amb.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: AMBASSADOR_WORKERS or 1)")
    amb.add_argument("--force", action="store_true",
                     help="allow a non-loopback address with inbound auth disabled")
    amb.set_defaults(handler=_ambassador)

    flows = sub.add_parser("flows", help="work with flows on the engine (push, run, ...)")
    flows_cli.add_commands(flows)
    components_cli.add_command(sub)
    knowledge = sub.add_parser("knowledge", help="knowledge bases: create, upload, list, search")
    knowledge_cli.add_commands(knowledge)

    up = sub.add_parser("up", help="run llm-sim, the engine and the ambassador with the demo flows")
    stack.add_arguments(up)
    up.set_defaults(handler=stack.up)
    return parser


def _engine(args: argparse.Namespace) -> int:
    """Check settings and migrate the store once in the master, then fork the workers."""
    workers = args.workers or int(os.environ.get("FLOW_ENGINE_WORKERS")
                                  or (2 if os.environ.get("REDIS_URL") else 1))
    _metrics_dir("flowgate-engine-metrics-", workers)  # before prometheus_client is imported
    _patch_and_preload("flow_engine.app")
    if args.insecure_no_auth:
        os.environ["FLOW_ENGINE_INSECURE_NO_AUTH"] = "1"

    from flow_engine.config import ConfigError, Settings
    from flow_engine.errors import FlowgateError
    from flow_engine.knowledge.service import KnowledgeConfigError, preflight
    from flow_engine.store import SqlFlowStore
    from flowgate.common.serving import serve

    try:
        settings = Settings.load()
        settings.check()
        store = SqlFlowStore(settings.database_url)
        store.migrate()
        try:  # FLOW_ENGINE_KNOWLEDGE=on without pgvector stops here, with the reason
            preflight(store, settings.knowledge)
        finally:
            store.close()
    except (ConfigError, FlowgateError, KnowledgeConfigError) as exc:
        print(f"flowgate engine: {exc}", file=sys.stderr)
        return 2
    if _port_taken("engine", args.host, args.port):
        return 2
    config_file = str(Path(__file__).resolve().parent.parent / "flow_engine" / "gunicorn_conf.py")
    serve(_engine_app, host=args.host, port=args.port, workers=args.workers,
          config_file=config_file)
    return 0


def _port_taken(name: str, host: str, port: int) -> bool:
    """Say so (and True) when another process listens on ``host:port`` — instead of
    gunicorn retrying for seconds and then failing with a trace of its own."""
    import errno
    import socket

    if not port:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return False  # gunicorn will say what is wrong with the address
            print(f"flowgate {name}: port {port} on {host} is already in use (another "
                  f"{name}? `make run` starts one); stop it or pass --port", file=sys.stderr)
            return True
    return False


def _patch_and_preload(*modules: str) -> None:
    """gevent-patch the master first, then import the app's modules once: forked workers
    inherit them (ready faster, pages shared copy-on-write) and nothing imported ssl or
    threading before the patch. The app itself is still built in each worker."""
    from gevent import monkey

    monkey.patch_all()
    for module in modules:
        __import__(module)


def _metrics_dir(prefix: str, workers: int) -> None:
    """Prometheus multiprocess mode for several workers: a fresh directory, set before the
    client is imported. One worker keeps plain in-process metrics (cheaper per request)."""
    import shutil
    import tempfile

    if workers <= 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # set but empty (flowgate up, a bench, a manifest) must mean unset: prometheus_client
        # picks its mmap-backed values when the variable merely exists, and writes their
        # files into the working directory
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        os.environ.pop("prometheus_multiproc_dir", None)
        return
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=prefix)
    else:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def _ambassador(args: argparse.Namespace) -> int:
    workers = args.workers or int(os.environ.get("AMBASSADOR_WORKERS") or 1)
    _metrics_dir("flowgate-ambassador-metrics-", workers)  # before prometheus_client is imported
    _patch_and_preload("ambassador.app")
    import ipaddress

    from ambassador import config as amb_config
    from flowgate.common.serving import serve

    if args.config:
        os.environ["AMBASSADOR_CONFIG"] = args.config
    from ambassador.filters.auth import Auth

    try:
        settings = amb_config.load()
        Auth(settings.inbound_auth)  # key files are read here, not first in a worker
    except amb_config.ConfigError as exc:
        print(f"flowgate ambassador: {exc}", file=sys.stderr)
        return 2
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and settings.inbound_auth.mode == "none" and not args.force:
        print(f"flowgate ambassador: refusing to listen on {args.host} with inbound_auth.mode "
              "none: anyone who can reach it could run flows with the engine's key. Configure "
              "api_keys or jwt, bind 127.0.0.1, or pass --force.", file=sys.stderr)
        return 2
    if not loopback and not args.force:  # and a hot reload may not turn auth off either
        os.environ[amb_config.REFUSE_NO_AUTH_ENV] = "1"
    if _port_taken("ambassador", args.host, args.port):
        return 2
    config_file = str(Path(__file__).resolve().parent.parent / "ambassador" / "gunicorn_conf.py")
    serve(_ambassador_app, host=args.host, port=args.port, workers=args.workers,
          config_file=config_file)
    return 0


def _ambassador_app():
    from ambassador.app import create_app

    return create_app()


def _engine_app():
    from flow_engine.app import create_app

    return create_app(migrate=False)


_load_json = flows_cli.load_json


def _demo(args: argparse.Namespace) -> int:
    from flow_engine.components import default_registry
    from flow_engine.config import Settings
    from flow_engine.errors import FlowInvalid
    from flow_engine.flows.compile import compile_flow
    from flow_engine.flows.model import FlowVersion
    from flow_engine.flows.validate import validate_flow
    from flow_engine.runs.runner import RunInput, stream

    settings = Settings.load()
    data = _load_json(args.flow)
    try:
        definition = validate_flow(data, default_registry(), settings.limits, flow_id=args.flow.stem)
    except FlowInvalid as exc:
        print(f"{args.flow}: invalid flow", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    with _llm_endpoint(settings, args.tps) as base_url:
        ctx = replace(settings, openai_base_url=base_url).build_context
        compiled = compile_flow(FlowVersion(definition.id, 1, definition), default_registry(), ctx)
        print(f"flow   {definition.name} ({definition.id}, {len(definition.nodes)} nodes)")
        print(f"llm    {base_url}")
        print(f"input  {args.input}\n")
        return _print_stream(stream(compiled, RunInput(input_value=args.input)))


def _print_stream(events) -> int:
    streaming_node = None
    status = 1
    for event in events:
        data = event.data
        if event.type == "node_started":
            print(f"  ▸ {data['node']} ({data['node_type']})", flush=True)
        elif event.type == "token":
            if streaming_node != data["node"]:
                streaming_node = data["node"]
                print("    ", end="")
            print(data["text"], end="", flush=True)
        elif event.type == "node_finished":
            if streaming_node == data["node"]:
                print()
                streaming_node = None
            print(f"  ✓ {data['node']} {data['duration_ms']:.1f} ms", flush=True)
        elif event.type == "error":
            print(f"\nrun failed: {data['code']}: {data['message']}", file=sys.stderr)
        elif event.type == "run_finished":
            usage = data["usage"]
            print(f"\noutput  {data['output']}")
            print(f"run     {data['run_id']}  {data['duration_ms']:.0f} ms  "
                  f"tokens in/out {usage['input_tokens']}/{usage['output_tokens']}")
            status = 0
    return status


@contextmanager
def _llm_endpoint(settings, tps: float):
    """The configured OpenAI-compatible endpoint, or a private llm-sim for the demo."""
    if settings.openai_base_url:
        yield settings.openai_base_url
        return
    port = _free_port()
    cmd = [sys.executable, "-m", "flowgate.llm_sim", "--port", str(port), "--ttft", "0.3",
           "--tps", str(tps), "--reply-tokens", "40"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # noqa: S603
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"flowgate: llm-sim exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback only
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"flowgate: llm-sim did not become ready within {timeout_s:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
