"""Reading a LangFlow export as plain data: its nodes, their fields, its edges.

The export's shape (LangFlow 1.x; ``GET /api/v1/flows/{id}`` and the UI's "Export" give the
same)::

    {"name", "description", "data": {
       "nodes": [{"id", "type": "genericNode" | "noteNode", "position",
                  "data": {"id", "type": <component>, "node": {
                     "display_name", "template": {<field>: {"value", "type", ...}},
                     "outputs": [{"name", "types"}], "edited", "tool_mode", ...}}}],
       "edges": [{"source", "target", "sourceHandle", "targetHandle",
                  "data": {"sourceHandle": {"id", "name", "dataType", "output_types"},
                           "targetHandle": {"id", "fieldName", "inputTypes", "type"}}}]}}

Only values are read: ``template.code`` (a component's Python source) and every other
string stay strings, never parsed as code, imported or evaluated. An edge's handles are
read from ``data``; when that is missing, from the ``sourceHandle``/``targetHandle``
strings, which are JSON with ``œ`` for quotes (parsed as JSON, nothing else). LangFlow's
loop-back edge (into a Loop component's ``item`` output) has ``targetHandle.name`` and no
``fieldName``: it is read as such (``loop_into``), for the translation to report once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flow_engine.errors import Problem

MAX_NODES = 1000  # far above the engine's own limit: refuse absurd input before mapping it
MAX_EDGES = 4000


@dataclass
class LfNode:
    index: int
    path: str  # $.flow.data.nodes[3]
    id: str
    kind: str  # genericNode, noteNode, ...
    type: str  # the component: ChatInput, Agent, ... ("" when missing)
    display_name: str
    template: dict[str, Any]
    outputs: list[dict[str, Any]]
    raw: dict[str, Any] = field(repr=False)

    @property
    def is_note(self) -> bool:
        return self.kind == "noteNode" or self.type == "note"

    @property
    def edited(self) -> bool:
        """LangFlow sets ``edited`` when someone changed the component's code."""
        return bool(self.raw.get("data", {}).get("node", {}).get("edited"))

    @property
    def is_group(self) -> bool:
        return isinstance(self.raw.get("data", {}).get("node", {}).get("flow"), dict)

    @property
    def has_code(self) -> bool:
        code = self.template.get("code")
        return isinstance(code, dict) and bool(code.get("value"))

    @property
    def label(self) -> str:
        return f"'{self.display_name}' ({self.id})" if self.display_name else f"'{self.id}'"

    def field_path(self, name: str) -> str:
        return f"{self.path}.data.node.template.{name}.value"

    def fields(self) -> list[str]:
        """The node's own fields (not LangFlow's bookkeeping)."""
        return [k for k, v in self.template.items()
                if isinstance(v, dict) and k != "code" and not k.startswith("_")]

    def value(self, name: str, default: Any = None) -> Any:
        spec = self.template.get(name)
        if not isinstance(spec, dict) or "value" not in spec:
            return default
        return spec["value"]

    def text(self, name: str, default: str = "") -> str:
        value = self.value(name)
        return value if isinstance(value, str) else default

    def number(self, name: str) -> int | float | None:
        value = self.value(name)
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            return value
        if isinstance(value, str):
            try:
                return float(value) if "." in value else int(value)
            except ValueError:
                return None
        return None

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.value(name, default)
        return value if isinstance(value, bool) else default

    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs if isinstance(o, dict) and isinstance(o.get("name"), str)]


@dataclass
class LfEdge:
    index: int
    path: str
    source: str
    target: str
    output: str  # sourceHandle.name
    field: str  # targetHandle.fieldName ("" on a loop-back edge)
    loop_into: str = ""  # a loop-back edge: the target's output it goes into (targetHandle.name)


@dataclass
class LfFlow:
    name: str
    description: str
    nodes: list[LfNode]
    edges: list[LfEdge]


def read_export(data: Any, root: str = "$.flow") -> tuple[LfFlow | None, list[Problem]]:
    """The export as :class:`LfFlow`, with every problem of its shape (all at once)."""
    problems: list[Problem] = []
    if not isinstance(data, dict):
        return None, [Problem(root, "a LangFlow export is a JSON object with 'data': "
                                    "{'nodes', 'edges'}")]
    graph = data.get("data")
    if not isinstance(graph, dict):
        return None, [Problem(f"{root}.data", "missing 'data' with 'nodes' and 'edges' (is this "
                                              "a LangFlow flow export?)")]
    raw_nodes, raw_edges = graph.get("nodes"), graph.get("edges", [])
    if not isinstance(raw_nodes, list):
        return None, [Problem(f"{root}.data.nodes", "nodes must be a list")]
    if not isinstance(raw_edges, list):
        return None, [Problem(f"{root}.data.edges", "edges must be a list")]
    if len(raw_nodes) > MAX_NODES or len(raw_edges) > MAX_EDGES:
        return None, [Problem(f"{root}.data", f"{len(raw_nodes)} nodes and {len(raw_edges)} "
                                              f"edges; at most {MAX_NODES} and {MAX_EDGES}")]
    nodes = [n for i, raw in enumerate(raw_nodes)
             if (n := _node(i, raw, f"{root}.data.nodes[{i}]", problems)) is not None]
    seen: dict[str, str] = {}
    for node in nodes:
        if node.id in seen:
            problems.append(Problem(f"{node.path}.id", f"duplicate node id '{node.id}' "
                                                       f"(also {seen[node.id]})"))
        seen.setdefault(node.id, node.path)
    edges = [e for i, raw in enumerate(raw_edges)
             if (e := _edge(i, raw, f"{root}.data.edges[{i}]", problems)) is not None]
    name = data.get("name")
    description = data.get("description")
    return LfFlow(name if isinstance(name, str) else "",
                  description if isinstance(description, str) else "", nodes, edges), problems


def _node(index: int, raw: Any, path: str, problems: list[Problem]) -> LfNode | None:
    if not isinstance(raw, dict):
        problems.append(Problem(path, "a node must be an object"))
        return None
    data = raw.get("data")
    node_id = raw.get("id") if isinstance(raw.get("id"), str) else (
        data.get("id") if isinstance(data, dict) else None)
    if not isinstance(node_id, str) or not node_id:
        problems.append(Problem(f"{path}.id", "a node needs a string id"))
        return None
    kind = raw.get("type") if isinstance(raw.get("type"), str) else ""
    if not isinstance(data, dict):
        problems.append(Problem(f"{path}.data", "a node needs 'data'"))
        return None
    info = data.get("node") if isinstance(data.get("node"), dict) else {}
    template = info.get("template") if isinstance(info.get("template"), dict) else {}
    type_ = data.get("type") if isinstance(data.get("type"), str) else ""
    if kind != "noteNode" and type_ != "note" and not info:
        problems.append(Problem(f"{path}.data.node", "a component node needs 'data.node' "
                                                     "with its template"))
        return None
    display = info.get("display_name") or data.get("display_name") or ""
    outputs = info.get("outputs") if isinstance(info.get("outputs"), list) else []
    return LfNode(index, path, node_id, kind, type_, display if isinstance(display, str) else "",
                  template, outputs, raw)


def _edge(index: int, raw: Any, path: str, problems: list[Problem]) -> LfEdge | None:
    if not isinstance(raw, dict):
        problems.append(Problem(path, "an edge must be an object"))
        return None
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    source_handle = _handle(data.get("sourceHandle"), raw.get("sourceHandle"))
    target_handle = _handle(data.get("targetHandle"), raw.get("targetHandle"))
    source, target = raw.get("source"), raw.get("target")
    output, field_name = source_handle.get("name"), target_handle.get("fieldName")
    loop_into = target_handle.get("name") if field_name is None else None
    if isinstance(loop_into, str) and loop_into and all(
            isinstance(v, str) and v for v in (source, target, output)):
        return LfEdge(index, path, source, target, output, "", loop_into)
    if not all(isinstance(v, str) and v for v in (source, target, output, field_name)):
        problems.append(Problem(path, "an edge needs source, target, sourceHandle.name and "
                                      "targetHandle.fieldName"))
        return None
    return LfEdge(index, path, source, target, output, field_name)


def _handle(parsed: Any, encoded: Any) -> dict[str, Any]:
    if isinstance(parsed, dict):
        return parsed
    if isinstance(encoded, str) and len(encoded) < 10_000:
        try:
            value = json.loads(encoded.replace("œ", '"'))
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}
