"""Schemathesis against both services' OpenAPI documents, on real servers: ``flowgate engine``
(gunicorn + gevent) with the llm-sim behind it, and ``flowgate ambassador`` in front of it.

Each service gets one ``schemathesis run`` (its CLI, in a subprocess) with a fixed seed and a
number of examples per operation (ENGINE_EXAMPLES, AMBASSADOR_EXAMPLES), not a time budget,
so that a slow machine tests exactly what a fast one does (under two minutes in all here):
examples, boundary and negative cases of every operation (coverage), random ones (fuzzing)
and chains of calls along the documents' links (stateful). Failures are

- every 5xx (``not_a_server_error``: the error contract has none for bad input);
- every answer that breaks its document: a status it does not list
  (``status_code_conformance``), another content type (``content_type_conformance``), a
  body that does not match the schema (``response_schema_conformance``).

So that the fuzzer gets past "404 flow not found", half of the flow and run ids it sends
are real ones (schemathesis dictionaries): a flow that runs on the llm-sim, a run of it.
``FLOWGATE_FUZZ_SCALE`` multiplies both example counts (longer local runs); the seed is
printed, and ``schemathesis`` prints a curl that reproduces each failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from support.procs import ServerProcess, start_owned

ADMIN_SECRET = "fuzz-admin-secret-0001"
PROXY_SECRET = "fuzz-ambassador-secret-0001"
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
SEED = 20261111
# measured on a loaded 2-core machine: ~40 s for the engine's, ~25 s for the ambassador's
ENGINE_N, AMBASSADOR_N = 20, 30
SCALE = float(os.environ.get("FLOWGATE_FUZZ_SCALE", "1") or 1)
# examples per operation in the fuzzing and stateful phases (coverage is exhaustive)
ENGINE_EXAMPLES = max(1, int(ENGINE_N * SCALE))
AMBASSADOR_EXAMPLES = max(1, int(AMBASSADOR_N * SCALE))
RUN_TIMEOUT_S = 240 * SCALE  # a hang, not a slow machine: the subprocess is stopped
# bounded inside (example counts, subprocess timeouts); more than the default 120 s in all
pytestmark = [pytest.mark.integration, pytest.mark.timeout(int(RUN_TIMEOUT_S) + 60)]
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
FLOW_ID = "fuzz-chat"
DOOMED_ID = "fuzz-doomed"  # what DELETE /flows/{flow_ref} may delete


def flow(flow_id: str) -> dict[str, Any]:
    return {"id": flow_id, "name": f"Fuzz {flow_id}",
            "nodes": [{"id": "in", "type": "ChatInput"},
                      {"id": "llm", "type": "ChatModel",
                       "params": {"provider": "openai", "model": "flowgate-sim", "max_retries": 0}},
                      {"id": "out", "type": "ChatOutput"}],
            "edges": [{"source": "in", "target": "llm"}, {"source": "llm", "target": "out"}]}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, llm_sim: Any) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("fuzz-engine")

    def make(port: int) -> ServerProcess:
        cmd = [sys.executable, "-m", "flowgate.cli", "engine", "--port", str(port)]
        return ServerProcess(cmd, port=port, ready_path="/readyz", name="engine", ready_timeout=30,
                             cwd=workdir, stop_timeout=5, env={
                                 "FLOW_ENGINE_API_KEYS": f"admin:admin:{ADMIN_SECRET},"
                                                         f"ambassador:runner+proxy:{PROXY_SECRET}",
                                 "DATABASE_URL": f"sqlite:///{workdir / 'engine.db'}",
                                 "OPENAI_BASE_URL": llm_sim.base_url,
                                 "REDIS_URL": "",
                                 "FLOW_ENGINE_GRACEFUL_TIMEOUT": "1",
                                 "FLOW_ENGINE_SSE_KEEPALIVE_S": "1",
                                 "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics")})

    proc = start_owned(make)
    try:
        for flow_id in (FLOW_ID, DOOMED_ID):
            created = requests.post(proc.url + "/api/v1/flows", json=flow(flow_id), headers=ADMIN,
                                    timeout=10)
            assert created.status_code == 201, created.text
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def run_id(engine: ServerProcess) -> str:
    resp = requests.post(f"{engine.url}/api/v1/run/{FLOW_ID}", json={"input_value": "hello"},
                         headers=ADMIN, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["run_id"]


def schemathesis_run(workdir: Path, url: str, examples: int, *, headers: dict[str, str],
                     bindings: dict[str, tuple[str, list[str]]],
                     operations: list[dict[str, Any]] | None = None,
                     exclude: list[str] | None = None) -> tuple[int, str]:
    """``schemathesis run URL`` with a config file of dictionaries: ``bindings`` maps a
    parameter (``path.flow_ref``, ``body.flow_id``) to a dictionary name and its values,
    each drawn half of the time."""
    # every 5xx is a failure; so would be 1xx by default, but 101 is a WebSocket's handshake
    lines = ["[checks.not_a_server_error]", 'expected-statuses = ["101", "2xx", "3xx", "4xx"]', ""]
    for _param, (name, values) in bindings.items():
        quoted = ", ".join(f'"{v}"' for v in values)
        lines += [f"[dictionaries.{name}]", f"values = [{quoted}]", ""]
    lines.append("[parameters]")
    for param, (name, _values) in bindings.items():
        lines.append(f'"{param}" = {{ dictionary = "{name}", probability = 0.5 }}')
    for op in operations or []:
        lines += ["", "[[operations]]", *(f"{k} = {_toml(v)}" for k, v in op.items())]
    config = workdir / "schemathesis.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
           "run", url, "--checks", CHECKS, "--seed", str(SEED), "--max-examples", str(examples),
           "--generation-database", "none",  # nothing carried over from an earlier run
           # one worker: Python 3.11.7's ast.parse is not thread-safe (CPython gh-106905:
           # "AST constructor recursion depth mismatch"), and Hypothesis parses lambdas with it
           "--request-timeout", "15", "--workers", "1", "--phases",
           "examples,coverage,fuzzing,stateful", "--warnings", "off"]
    for name, value in headers.items():
        cmd += ["--header", f"{name}: {value}"]
    for name in exclude or []:
        cmd += ["--exclude-name", name]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, env={**os.environ, "NO_COLOR": "1"},
                          stdin=subprocess.DEVNULL, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + " }"
    return f'"{value}"' if isinstance(value, str) else str(value).lower()


def failures(output: str) -> str:
    """The FAILURES section of schemathesis' report (or its tail when there is none)."""
    match = re.search(r"=+ FAILURES =+\n(.*?)(?:\n=+ [A-Z]+ =+\n|\Z)", output, re.S)
    return match.group(1) if match else output[-4000:]


def summary_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if re.match(r"^=+ .* in [\d.]+s =+$", ln)]
    return lines[-1] if lines else ""


def test_engine_openapi_fuzz(engine: ServerProcess, run_id: str, tmp_path: Path):
    doc = requests.get(engine.url + "/api/v1/openapi.json", headers=ADMIN, timeout=10)
    assert doc.status_code == 200, doc.text
    code, output = schemathesis_run(
        tmp_path, engine.url + "/api/v1/openapi.json", ENGINE_EXAMPLES, headers=ADMIN,
        bindings={"path.flow_ref": ("flows", [FLOW_ID]), "path.run_id": ("runs", [run_id])},
        # deleting the flow every other call would leave nothing to run
        operations=[{"include-name": "DELETE /api/v1/flows/{flow_ref}",
                     "parameters": {"path.flow_ref": DOOMED_ID}}])
    print(summary_line(output))
    assert code == 0, f"schemathesis found problems in the engine (seed {SEED}):\n{failures(output)}"


@pytest.fixture(scope="module")
def ambassador(tmp_path_factory: pytest.TempPathFactory, engine: ServerProcess) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("fuzz-ambassador")
    config = workdir / "ambassador.yaml"
    config.write_text(yaml.safe_dump({
        "upstream": {"timeouts": {"connect_s": 0.5, "per_try_s": 10, "total_s": 15}},
        "flows": {FLOW_ID: {"cache": {"ttl_s": 60}}}}), encoding="utf-8")

    def make(port: int) -> ServerProcess:
        cmd = [sys.executable, "-m", "flowgate.cli", "ambassador", "--port", str(port)]
        return ServerProcess(cmd, port=port, ready_path="/readyz", name="ambassador",
                             ready_timeout=30, cwd=workdir, stop_timeout=5, env={
                                 "AMBASSADOR_CONFIG": str(config),
                                 "AMBASSADOR_UPSTREAM_URL": engine.url,
                                 "AMBASSADOR_UPSTREAM_KEY": PROXY_SECRET,
                                 "REDIS_URL": "",
                                 "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics")})

    proc = start_owned(make)
    try:
        yield proc
    finally:
        proc.stop()


def test_ambassador_openapi_fuzz(ambassador: ServerProcess, tmp_path: Path):
    doc = requests.get(ambassador.url + "/openapi.json", timeout=10)
    assert doc.status_code == 200, doc.text
    run = requests.post(ambassador.url + "/run-flow", json={"flow_id": FLOW_ID, "input": "hi"},
                        timeout=30)
    assert run.status_code == 200, run.text
    code, output = schemathesis_run(
        tmp_path, ambassador.url + "/openapi.json", AMBASSADOR_EXAMPLES, headers={},
        bindings={"body.flow_id": ("flows", [FLOW_ID]), "path.run_id": ("runs", [run.json()["run_id"]])},
        # an HTTP client cannot speak the WebSocket it upgrades to (tests/ambassador cover it)
        exclude=["GET /ws/run-flow"])
    print(summary_line(output))
    assert code == 0, f"schemathesis found problems in the ambassador (seed {SEED}):\n{failures(output)}"
