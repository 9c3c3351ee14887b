"""The state of one translation: the Flowgate nodes and edges made so far, where each came
from in the export, which LangFlow field or output each Flowgate port stands for, and the
report of what happened to every node, field and edge.

Mappers (``mappers.py``, ``model_mappers.py``) call :class:`Builder` and never build dicts of
their own, so that every Flowgate node and param can be traced back to the LangFlow node
and field it came from: the report lists it, and a validation problem of the Flowgate
definition is reported at the LangFlow path the user can fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flow_engine.components.base import ComponentRegistry
from flow_engine.errors import Problem
from flow_engine.interop.langflow.reader import LfEdge, LfFlow, LfNode

_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_SLOT_CHARS = re.compile(r"[^A-Za-z0-9_]+")


@dataclass(frozen=True)
class Target:
    """A Flowgate node's input (or output): where a LangFlow field (or output) went."""

    node: str
    port: str | None


@dataclass
class NodeReport:
    path: str
    langflow_id: str
    langflow_type: str
    display_name: str
    status: str = "mapped"  # mapped | merged | dropped | unsupported | invalid
    flowgate: list[dict[str, str]] = field(default_factory=list)
    reason: str | None = None
    carried: list[dict[str, str]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"path": self.path, "langflow_id": self.langflow_id,
                                "langflow_type": self.langflow_type,
                                "display_name": self.display_name, "status": self.status,
                                "flowgate": self.flowgate}
        if self.reason:
            body["reason"] = self.reason
        body["fields"] = {"carried": self.carried, "ignored": self.ignored}
        return body


@dataclass
class Unsupported:
    path: str
    langflow_type: str
    display_name: str
    what_to_do: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "langflow_type": self.langflow_type,
                "display_name": self.display_name, "what_to_do": self.what_to_do}


InputRule = Target | Callable[[LfEdge], Target | None]


class Builder:
    def __init__(self, flow: LfFlow, registry: ComponentRegistry) -> None:
        self.flow = flow
        self.registry = registry
        self.by_id = {n.id: n for n in flow.nodes}
        self.incoming: dict[tuple[str, str], list[LfEdge]] = {}
        self.outgoing: dict[str, list[LfEdge]] = {}
        for edge in flow.edges:
            self.incoming.setdefault((edge.target, edge.field), []).append(edge)
            self.outgoing.setdefault(edge.source, []).append(edge)
        self.nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []
        self.edge_origin: list[str] = []  # per Flowgate edge: the LangFlow path it came from
        self.origin: dict[str, tuple[str, dict[str, str]]] = {}  # fg id → (path, param → path)
        self.inputs: dict[tuple[str, str], InputRule] = {}
        self.outputs: dict[tuple[str, str], Target] = {}
        self.reports: dict[str, NodeReport] = {}
        self.edge_reports: list[dict[str, Any]] = []
        self.problems: list[Problem] = []
        self.unsupported_nodes: list[Unsupported] = []
        self.warnings: list[dict[str, str]] = []
        self._ids: set[str] = set()
        self._params: dict[str, dict[str, Any]] = {}

    # -- nodes -------------------------------------------------------------------------------

    def report(self, node: LfNode) -> NodeReport:
        if node.id not in self.reports:
            self.reports[node.id] = NodeReport(node.path, node.id, node.type or node.kind,
                                               node.display_name)
        return self.reports[node.id]

    def add(self, node: LfNode, type_: str, params: dict[str, Any], *,
            carried: dict[str, str] | None = None, suffix: str = "", added: str = "") -> str:
        """A Flowgate node for ``node`` (``suffix``: a helper node next to the main one;
        ``added``: why a node LangFlow has no counterpart for was added)."""
        fid = self._new_id(node.id, suffix)
        entry: dict[str, Any] = {"id": fid, "type": type_, "params": params}
        if node.display_name and not suffix:
            entry["label"] = node.display_name[:200]
        position = node.raw.get("position")
        if isinstance(position, dict) and all(isinstance(position.get(k), int | float)
                                              for k in ("x", "y")):
            entry["position"] = {"x": position["x"], "y": position["y"]}
        self.nodes.append(entry)
        self._params[fid] = params
        paths = {param: node.field_path(lf_field) for param, lf_field in (carried or {}).items()}
        self.origin[fid] = (node.path, paths)
        report = self.report(node)
        report.flowgate.append({"id": fid, "type": type_, **({"added": added} if added else {})})
        for param, lf_field in (carried or {}).items():
            self.carry(node, lf_field, node=fid, param=param)
        return fid

    def params(self, fid: str) -> dict[str, Any]:
        """The params of a Flowgate node made earlier (still editable until the end)."""
        return self._params[fid]

    def carry(self, lf: LfNode, lf_field: str, /, **into: str) -> None:
        """Report that ``lf_field`` of ``lf`` lives on: ``node=…, param=…`` (a Flowgate
        param), ``node=…, input=…`` (edges into it feed that input) or ``note=…``."""
        if lf_field in lf.template:
            self.report(lf).carried.append({"field": lf_field, **into})

    def ignore(self, node: LfNode, lf_field: str, reason: str) -> None:
        report = self.report(node)
        if lf_field in node.template and not any(i["field"] == lf_field for i in report.ignored):
            report.ignored.append({"field": lf_field, "reason": reason})

    def drop(self, node: LfNode, reason: str, status: str = "dropped") -> None:
        report = self.report(node)
        report.status, report.reason = status, reason

    def unsupported(self, node: LfNode, what_to_do: str) -> None:
        self.drop(node, what_to_do, "unsupported")
        self.unsupported_nodes.append(Unsupported(node.path, node.type or node.kind,
                                                  node.display_name, what_to_do))
        self.problems.append(Problem(node.path, f"LangFlow node {node.label} of type "
                                                f"'{node.type or node.kind}' has no Flowgate "
                                                f"equivalent: {what_to_do}"))

    def warn(self, node: LfNode | None, code: str, message: str, path: str | None = None) -> None:
        self.warnings.append({"path": path or (node.path if node else "$.flow"), "code": code,
                              "message": message})

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    # -- ports and edges ---------------------------------------------------------------------

    def input(self, node: LfNode, lf_field: str, rule: InputRule) -> None:
        """Edges into ``lf_field`` of ``node`` go to ``rule`` (a port, or a function of the
        edge for fields that take many edges)."""
        self.inputs[(node.id, lf_field)] = rule

    def output(self, node: LfNode, lf_output: str, fid: str, port: str | None = None) -> None:
        self.outputs[(node.id, lf_output)] = Target(fid, port)

    def fed(self, node: LfNode, lf_field: str) -> list[LfEdge]:
        return self.incoming.get((node.id, lf_field), [])

    def link(self, source: str, target: str, target_input: str | None, origin: str,
             source_output: str | None = None) -> None:
        edge: dict[str, Any] = {"source": source, "target": target}
        if target_input:
            edge["target_input"] = target_input
        if source_output:
            edge["source_output"] = source_output
        self.edges.append(edge)
        self.edge_origin.append(origin)

    def slot(self, fid: str, source_id: str) -> str:
        """A new tool slot of Agent ``fid`` named after the tool's node."""
        tools = self.params(fid).setdefault("tools", [])
        base = _SLOT_CHARS.sub("_", source_id).strip("_")[:36] or "tool"
        name, n = base, 2
        while name in tools:
            name, n = f"{base}_{n}", n + 1
        tools.append(name)
        return name

    # -- ids ---------------------------------------------------------------------------------

    def _new_id(self, lf_id: str, suffix: str) -> str:
        base = _ID_CHARS.sub("-", lf_id).strip("-._")[:48] or "node"
        if not base[0].isalnum():
            base = "n" + base
        base = f"{base}-{suffix}" if suffix else base
        fid, n = base, 2
        while fid in self._ids:
            fid, n = f"{base}-{n}", n + 1
        self._ids.add(fid)
        return fid
