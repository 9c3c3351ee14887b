"""The engine hooks of /tmp/langflow-hooks.patch, applied in-process where they can be, so
these tests run on the tree before the patch as after it: a registry with the new node
types, the sub-flow runner in the build context, the import/export blueprint and its roles.

What cannot be applied in-process is the runner's part (tool events, the run context);
tests that need it are marked :data:`needs_runner_hook` and skip until the patch is in.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from flask import Flask

from flow_engine.auth import ROUTE_ROLES
from flow_engine.components import ALL_COMPONENTS, ComponentRegistry
from flow_engine.components.agent import Agent
from flow_engine.components.subflows import SUBFLOWS, EngineSubflows
from flow_engine.components.template_parser import Parser
from flow_engine.components.tools import BM25SearchTool, Calculator, FlowTool
from flow_engine.interop import api as interop_api
from flow_engine.runs.recorder import RunRecorder

NEW_COMPONENTS = (Agent, Calculator, FlowTool, BM25SearchTool, Parser)
ROLES = {"interop.import_langflow": "editor", "interop.export_langflow": "runner"}
RUNNER_HOOKED = "on_tool_start" in vars(RunRecorder)
needs_runner_hook = pytest.mark.skipif(
    not RUNNER_HOOKED, reason="needs the runner part of /tmp/langflow-hooks.patch (tool events, "
                              "the run context)")


def registry(*extra: type) -> ComponentRegistry:
    """Every node type of the engine plus the new ones (and ``extra``), each once."""
    classes: dict[str, type] = {}
    for cls in (*ALL_COMPONENTS, *NEW_COMPONENTS, *extra):
        classes.setdefault(cls.type_name, cls)
    return ComponentRegistry(cls() for cls in classes.values())


def apply(app: Flask, monkeypatch: pytest.MonkeyPatch, *extra: type) -> Flask:
    flows = app.extensions["flowgate"].flows
    if extra or not all(cls.type_name in flows.registry for cls in NEW_COMPONENTS):
        flows.registry = registry(*extra)
    context = flows.build_context
    if SUBFLOWS not in context.extra:
        flows.build_context = replace(context, extra={**context.extra,
                                                      SUBFLOWS: EngineSubflows(flows)})
    if "interop" not in app.blueprints:
        app.register_blueprint(interop_api.bp, url_prefix="/api/v1")
    for endpoint, role in ROLES.items():
        if ROUTE_ROLES.get(endpoint) != role:
            monkeypatch.setitem(ROUTE_ROLES, endpoint, role)
    return app


def answer(body: Any) -> str:
    return body["output"]
