"""Helpers for the deployment tests: external tools, rendered kustomize overlays, and the
metrics the services really export.

A test that needs a tool or package that is not installed skips locally and FAILS under CI
(tests/support/needs.py): a green CI run must have checked every manifest. What CI installs:

- ``kubectl`` with kustomize v5 (the apt package ``kubectl`` that the machine comes with;
  Debian's own ``kubernetes-client`` 1.20 bundles kustomize v2, too old for these files)
- ``promtool`` (Debian package ``prometheus``)
- ``kubernetes-validate``, ``check-jsonschema`` (it ships the Compose Specification schema)
  and ``dockerfile`` (Docker's Dockerfile parser) from PyPI
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from support.needs import missing

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TOOL_HINTS = {
    "kubectl": "apt-get install kubectl (needs kustomize v5: kubectl >= 1.27)",
    "promtool": "apt-get install prometheus",
}


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed: {TOOL_HINTS.get(name, name)}")
    return path


def require_module(name: str, pip_name: str) -> ModuleType:
    try:
        return __import__(name)
    except ImportError:
        missing(f"the Python package {pip_name} is not installed: pip install {pip_name}")
        raise  # unreachable: missing() always raises


def run(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = require_tool("kubectl")
    out = run([path, "version", "--client", "--output=json"])
    version = json.loads(out.stdout or "{}").get("kustomizeVersion", "") if out.returncode == 0 else ""
    major = re.match(r"v?(\d+)", version)
    if not major or int(major.group(1)) < 5:
        missing(f"{path} bundles kustomize {version or '(unknown)'}; these kustomizations need v5 "
                f"({TOOL_HINTS['kubectl']})")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")


@functools.cache
def _render(kubectl: str, overlay: str) -> tuple[dict, ...]:
    out = run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)])
    assert out.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@pytest.fixture(scope="session")
def render(kubectl: str):
    """``render("dev")``: the overlay's documents as built by ``kubectl kustomize``."""
    return lambda overlay: _render(kubectl, overlay)


@pytest.fixture(scope="session")
def kubernetes_validate() -> ModuleType:
    return require_module("kubernetes_validate", "kubernetes-validate")


@pytest.fixture(scope="session")
def dockerfile_parser() -> ModuleType:
    """``dockerfile.parse_file``: Docker's own (Go) Dockerfile parser, from PyPI."""
    return require_module("dockerfile", "dockerfile")


@pytest.fixture(scope="session")
def compose_schema() -> dict:
    """The Compose Specification JSON schema as vendored by check-jsonschema (from the
    compose-spec project; license in check_jsonschema/builtin_schemas/vendor/licenses)."""
    require_module("check_jsonschema", "check-jsonschema")
    from importlib.resources import files

    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))


# -- the metrics the services export ---------------------------------------------------------

METRIC_SOURCES = (REPO / "flow_engine" / "metrics.py", REPO / "ambassador" / "metrics.py")
SERIES_SUFFIXES = {"Histogram": ("_bucket", "_sum", "_count"), "Summary": ("_sum", "_count")}


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # Counter | Gauge | Histogram | Summary
    labels: frozenset[str]


@pytest.fixture(scope="session")
def exported_metrics() -> dict[str, Metric]:
    """Every metric defined in flow_engine/metrics.py and ambassador/metrics.py, read from
    the source (``Counter("name", "help", ["label", ...])``), by every series name it
    exposes: a histogram also by its ``_bucket``, ``_sum`` and ``_count`` series; and the
    process-tree series of flowgate/common/saturation.py."""
    series: dict[str, Metric] = {}
    for source in METRIC_SOURCES:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("Counter", "Gauge", "Histogram", "Summary")):
                continue
            if not (node.args and isinstance(node.args[0], ast.Constant)):
                continue
            labels = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "labelnames"), None)
            names = frozenset(ast.literal_eval(labels)) if labels is not None else frozenset()
            metric = Metric(node.args[0].value, node.func.id, names)
            series[metric.name] = metric
            for suffix in SERIES_SUFFIXES.get(metric.kind, ()):
                series[metric.name + suffix] = metric
    assert series, f"no metric definitions found in {METRIC_SOURCES}"
    # and the process-tree series both services add at scrape time (flowgate/common/saturation.py)
    from flowgate.common.saturation import ProcessTreeCollector

    for prefix in ("flowgate_engine", "flowgate_ambassador"):
        for family in ProcessTreeCollector(prefix).collect():
            for sample in family.samples:
                series[sample.name] = Metric(sample.name, family.type.capitalize(), frozenset())
    return series


# -- `flowgate up` and other commands run as a user runs them (tests that start processes) ---

@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; ``start`` (clock ticks after boot) tells a reused pid apart."""

    pid: int
    ppid: int
    start: int
    cmdline: str

    def running(self) -> bool:
        """Still this process (not a reused pid) and not a zombie."""
        now = read_proc(self.pid)
        return now is not None and now.start == self.start and _proc_state(self.pid) not in ("Z", "X")

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.cmdline}"


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return Proc(pid, int(fields[1]), int(fields[19]), cmdline)


def process_tree(root: int) -> list[Proc]:
    """``root`` and every process descended from it (Linux /proc), root first."""
    procs = [p for p in (read_proc(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit())
             if p is not None]
    children: dict[int, list[Proc]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    top = read_proc(root)
    tree, todo = ([top] if top else []), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child.pid)
    return tree


def port_in_use(port: int) -> bool:
    """Something listens on 127.0.0.1:port (a bind with SO_REUSEADDR fails, as a server's would)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class Background:
    """A command started as if typed in a terminal and left running: its own process group,
    SIGINT at its default action (a parent that ignores SIGINT must not make Ctrl-C a no-op),
    stdout and stderr to ``log``. :meth:`interrupt` is Ctrl-C: SIGINT to the whole group.
    Every descendant ever seen is remembered so :meth:`kill` can clean up even processes that
    left the group (``flowgate up`` starts each service in its own session)."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.args, self.log = args, log
        self.seen: dict[int, Proc] = {}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.started = time.monotonic()

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def snapshot(self) -> list[Proc]:
        tree = process_tree(self.proc.pid)
        self.seen.update((p.pid, p) for p in tree)
        return tree

    def wait_for_output(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the command exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.snapshot()
            found = re.search(pattern, self.output(), re.MULTILINE)
            if found:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"`{' '.join(self.args)}` exited with {self.proc.returncode} before printing "
                            f"{pattern!r}; its output:\n{self.output()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(self.args)}` did not print {pattern!r} within {timeout_s:.0f} s; "
                            f"its output so far:\n{self.output()}", pytrace=False)
            time.sleep(0.1)

    def interrupt(self, timeout_s: float) -> tuple[int | None, float, list[Proc]]:
        """Ctrl-C. Returns (exit code or None, seconds until it exited, processes of the tree
        still running ``timeout_s`` after the signal)."""
        before = self.snapshot()
        t0 = time.monotonic()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - t0
        deadline = t0 + timeout_s
        while any(p.running() for p in before) and time.monotonic() < deadline:
            time.sleep(0.05)
        return code, took, [p for p in before if p.running()]

    def kill(self) -> None:
        """SIGKILL to the group and to each remembered descendant that still runs."""
        if self.proc.poll() is None:
            self.snapshot()
        for proc in [self.seen.get(self.proc.pid), *self.seen.values()]:
            if proc is not None and proc.running():
                for kill in (os.killpg, os.kill):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class Processes:
    """The ``processes`` fixture: start commands in the background (:class:`Background`) and
    find the tools they need; everything started is killed when the module's tests are done."""

    def __init__(self) -> None:
        self.started: list[Background] = []

    def start(self, args: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> Background:
        proc = Background(args, cwd=cwd, env=env, log=log)
        self.started.append(proc)
        return proc

    @staticmethod
    def tool(name: str, hint: str) -> str:
        """The tool's path; skip locally, fail under CI when it is not installed."""
        path = shutil.which(name)
        if path is None:
            missing(f"{name} is not installed: {hint}")
        return path

    @staticmethod
    def port_in_use(port: int) -> bool:
        return port_in_use(port)

    def cleanup(self) -> None:
        for proc in reversed(self.started):
            proc.kill()


@pytest.fixture(scope="module")
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.cleanup()
