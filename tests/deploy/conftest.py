"""Helpers for the deployment tests: external tools, rendered kustomize overlays, and the
metrics the services really export.

A test that needs a tool or package that is not installed skips locally and FAILS under CI
(``CI`` set): a green CI run must have checked every manifest. What CI installs:

- ``kubectl`` with kustomize v5 (the apt package ``kubectl`` that the machine comes with;
  Debian's own ``kubernetes-client`` 1.20 bundles kustomize v2, too old for these files)
- ``promtool`` (Debian package ``prometheus``)
- ``kubernetes-validate``, ``check-jsonschema`` (it ships the Compose Specification schema)
  and ``dockerfile`` (Docker's Dockerfile parser) from PyPI
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TOOL_HINTS = {
    "kubectl": "apt-get install kubectl (needs kustomize v5: kubectl >= 1.27)",
    "promtool": "apt-get install prometheus",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing(reason: str) -> None:
    """Skip locally, fail under CI: nothing a CI run needs may be silently left out."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this check must run)", pytrace=False)
    pytest.skip(reason)


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
    exposes: a histogram also by its ``_bucket``, ``_sum`` and ``_count`` series."""
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
    return series
