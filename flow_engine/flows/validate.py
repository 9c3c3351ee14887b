"""Parse and validate a flow definition, reporting every problem at once.

Each :class:`~flow_engine.errors.Problem` has a JSON path (``$.nodes[2].params.k``) and a
message that says how to fix it. Node types come only from the component registry that is
passed in; nothing in a definition is ever imported or evaluated.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from flow_engine.components.base import Component, ComponentRegistry, Limits
from flow_engine.errors import FlowInvalid, Problem
from flow_engine.flows.model import Edge, FlowDefinition, Node
from flow_engine.jsontext import encodable
from flowgate.common.run_request import tweaks_problem

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always with fullmatch
_TOP_KEYS = {"id", "name", "description", "nodes", "edges", "tweakable"}
_NODE_KEYS = {"id", "type", "params", "position", "label"}
_EDGE_KEYS = {"source", "target", "source_output", "target_input", "id"}
DEFAULT_LIMITS = Limits()
_LONE_SURROGATE = ("must be text, but holds a lone surrogate (an escape \\ud800-\\udfff that "
                   "is not half of a pair, so not a character)")


def validate_flow(
    data: Any,
    registry: ComponentRegistry,
    limits: Limits = DEFAULT_LIMITS,
    *,
    flow_id: str | None = None,
) -> FlowDefinition:
    """Return the typed definition of ``data`` or raise :class:`FlowInvalid` listing all problems.

    ``flow_id`` supplies the id when the definition has none (the API assigns one).
    """
    problems: list[Problem] = []
    add = lambda path, msg: problems.append(Problem(path, msg))  # noqa: E731

    if not isinstance(data, dict):
        raise FlowInvalid([Problem("$", f"a flow must be a JSON object, got {_kind(data)}")])
    size = len(json.dumps(data, separators=(",", ":"), default=str))
    if size > limits.max_definition_bytes:
        raise FlowInvalid(
            [Problem("$", f"definition is {size} bytes; the limit is {limits.max_definition_bytes}")]
        )
    for key in data:
        if key not in _TOP_KEYS:
            add(f"$.{key}", f"unknown key '{key}' (allowed: {', '.join(sorted(_TOP_KEYS))})")

    fid = data.get("id", flow_id)
    id_ok = isinstance(fid, str) and bool(ID_RE.fullmatch(fid))
    if fid is None:
        add("$.id", "missing flow id")
    elif not id_ok:
        add("$.id", "flow id must be 1-64 characters of letters, digits, '_', '.', '-'")
    name = data.get("name", fid if id_ok else None)
    if "name" in data or id_ok:  # a missing name defaults to the id; report the id once
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            add("$.name", "name must be a non-empty string of at most 200 characters")
        elif not encodable(name):
            add("$.name", _LONE_SURROGATE)
    description = data.get("description", "")
    if not isinstance(description, str):
        add("$.description", "description must be a string")
    elif not encodable(description):
        add("$.description", _LONE_SURROGATE)

    nodes, seen_ids, complete = _check_nodes(data.get("nodes"), registry, limits, add)
    edges = _check_edges(data.get("edges", []), nodes, seen_ids, limits, add)
    if complete and edges is not None:
        _check_graph(nodes, edges, add)
    if "tweakable" in data:
        _check_tweakable(data["tweakable"], nodes, seen_ids, add)

    if problems:
        raise FlowInvalid(problems)
    return FlowDefinition(
        id=fid,
        name=name,
        description=description,
        nodes=tuple(Node(n.id, n.type, copy.deepcopy(n.params)) for n, _ in nodes.values()),
        edges=tuple(edges),
        raw=copy.deepcopy(data),
    )


def _check_tweakable(raw: Any, nodes, seen_ids, add) -> None:
    """``tweakable``: ``{node_id: [param, ...]}``, the params callers may change per run."""
    if not isinstance(raw, dict):
        add("$.tweakable", 'tweakable must be an object like {"llm": ["temperature"]}')
        return
    for node_id, params in raw.items():
        path = f"$.tweakable.{node_id}"
        if node_id not in seen_ids:
            add(path, f"no node '{node_id}' in this flow")
            continue
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            add(path, "a node's tweakable params are a list of param names")
            continue
        if node_id not in nodes:
            continue  # the node's own problem is reported
        component = nodes[node_id][0].component
        known = component.params_schema.get("properties", {})
        for param in params:
            if param in component.locked_params:
                add(path, f"'{param}' of a {component.type_name} can never be tweaked (it "
                    "decides where requests and the engine's key go); publish a new version")
            elif param not in known:
                add(path, f"{component.type_name} has no param '{param}' "
                    f"(params: {', '.join(sorted(known)) or 'none'})")


def apply_tweaks(data: Mapping[str, Any], tweaks: Any,
                 registry: ComponentRegistry | None = None) -> dict[str, Any]:
    """Return a copy of the raw definition with ``tweaks`` (``{node_id: {param: value}}``,
    LangFlow's run-time overrides) merged into node params. Tweaks are opt-in: only the
    params the definition lists in ``tweakable`` may be changed; anything else (and a
    malformed tweaks object) raises :class:`FlowInvalid` naming ``$.tweaks.<node>.<param>``.
    Validate the result like any definition: tweaked values obey the same limits."""
    if not tweaks:
        return dict(data)
    problems: list[Problem] = []
    problem = tweaks_problem(tweaks)
    if problem:
        raise FlowInvalid([Problem("$.tweaks", problem)])
    merged = copy.deepcopy(dict(data))
    allowed = merged.get("tweakable") if isinstance(merged.get("tweakable"), dict) else {}
    by_id = {n.get("id"): n for n in merged.get("nodes", []) if isinstance(n, dict)}
    for node_id, params in tweaks.items():
        node = by_id.get(node_id)
        if node is None:
            problems.append(Problem(f"$.tweaks.{node_id}", f"no node '{node_id}' in this flow"))
            continue
        if not isinstance(params, dict):
            problems.append(Problem(f"$.tweaks.{node_id}", "tweaks for a node must be an object"))
            continue
        component = registry.get(node.get("type")) if registry is not None else None
        open_ = allowed.get(node_id) or []
        for name in params:
            if component is not None and name in component.locked_params:
                problems.append(Problem(
                    f"$.tweaks.{node_id}.{name}",
                    f"'{name}' of a {component.type_name} cannot be changed per run; "
                    "publish a new flow version instead"))
            elif name not in open_:
                listed = ", ".join(open_) if open_ else "none"
                problems.append(Problem(
                    f"$.tweaks.{node_id}.{name}",
                    f"'{name}' of node '{node_id}' is not tweakable in this flow (tweakable: "
                    f"{listed}); the flow's author can list it in \"tweakable\""))
        node["params"] = {**(node.get("params") or {}), **params}
    if problems:
        raise FlowInvalid(problems)
    return merged


def tweak_problems(problems: list[Problem], merged: Mapping[str, Any],
                   tweaks: Mapping[str, Any]) -> list[Problem]:
    """``problems`` of a definition with ``tweaks`` applied (``apply_tweaks``), with those a
    tweak caused moved to where the caller wrote it: ``$.nodes[2].params.temperature`` →
    ``$.tweaks.llm.temperature`` (and an unknown tweaked param → ``$.tweaks.llm``). The caller
    sent tweaks, not the stored definition, so that is where the fix goes."""
    nodes = merged.get("nodes") or []
    out = []
    for problem in problems:
        match = _NODE_PARAMS.match(problem.path)
        if match is not None:
            index, param = int(match["index"]), match["param"]
            node = nodes[index] if index < len(nodes) and isinstance(nodes[index], dict) else {}
            tweaked = tweaks.get(node.get("id"))
            if isinstance(tweaked, dict):
                if param is not None and param in tweaked:
                    problem = Problem(f"$.tweaks.{node['id']}.{param}", problem.message)
                elif param is None and any(f"'{k}'" in problem.message for k in tweaked):
                    problem = Problem(f"$.tweaks.{node['id']}", problem.message)
        out.append(problem)
    return out


_NODE_PARAMS = re.compile(r"^\$\.nodes\[(?P<index>\d+)\]\.params(?:\.(?P<param>[^.\[]+))?$")


class _NodeInfo:
    __slots__ = ("component", "id", "index", "inputs", "params", "type")

    def __init__(self, index: int, node_id: str, type_: str, params: dict, component: Component):
        self.index, self.id, self.type, self.params = index, node_id, type_, params
        self.component = component
        self.inputs = {p.name: p for p in component.inputs(component.with_defaults(params))}


def _check_nodes(raw, registry, limits, add):
    """Return ``(usable nodes by id, every well-formed node id, whether all nodes are usable)``."""
    nodes: dict[str, tuple[_NodeInfo, int]] = {}
    seen: dict[str, int] = {}
    if not isinstance(raw, list) or not raw:
        add("$.nodes", "nodes must be a non-empty list")
        return nodes, seen, False
    if len(raw) > limits.max_nodes:
        add("$.nodes", f"{len(raw)} nodes; the limit is {limits.max_nodes}")
        return nodes, seen, False
    ok = True
    for i, node in enumerate(raw):
        path = f"$.nodes[{i}]"
        if not isinstance(node, dict):
            add(path, f"a node must be an object, got {_kind(node)}")
            ok = False
            continue
        for key in node:
            if key not in _NODE_KEYS:
                add(f"{path}.{key}", f"unknown key '{key}' on a node (allowed: id, type, params)")
        node_id, type_ = node.get("id"), node.get("type")
        params = node.get("params", {})
        if not isinstance(node_id, str) or not ID_RE.fullmatch(node_id):
            add(f"{path}.id", "node id must be 1-64 characters of letters, digits, '_', '.', '-'")
            ok = False
            continue
        if node_id in seen:
            add(f"{path}.id", f"duplicate node id '{node_id}' (also $.nodes[{seen[node_id]}])")
            ok = False
            continue
        seen[node_id] = i
        if not isinstance(params, dict):
            add(f"{path}.params", f"params must be an object, got {_kind(params)}")
            ok = False
            continue
        component = registry.get(type_) if isinstance(type_, str) else None
        if component is None:
            hint = registry.suggest(type_) if isinstance(type_, str) else None
            add(
                f"{path}.type",
                f"unknown node type {json.dumps(type_)}"
                + (f"; did you mean '{hint}'?" if hint else "")
                + f" (known types: {', '.join(registry.names())})",
            )
            ok = False
            continue
        for sub, message in component.check_params(params, limits):
            add(f"{path}.params{sub}", message)
        nodes[node_id] = (_NodeInfo(i, node_id, type_, params, component), i)
    # Edges are still checked against the nodes that parsed; graph-level problems (cycles,
    # unconnected inputs) are only reported when every node is known.
    return nodes, seen, ok


def _check_edges(raw, nodes, seen_ids, limits, add) -> list[Edge] | None:
    if not isinstance(raw, list):
        add("$.edges", "edges must be a list")
        return None
    if len(raw) > limits.max_edges:
        add("$.edges", f"{len(raw)} edges; the limit is {limits.max_edges}")
        return None
    if not seen_ids:  # the nodes list itself is unusable (reported); edges cannot be judged
        return None
    edges: list[Edge] = []
    taken: dict[tuple[str, str], int] = {}
    ok = True
    for i, edge in enumerate(raw):
        path = f"$.edges[{i}]"
        if not isinstance(edge, dict):
            add(path, f"an edge must be an object, got {_kind(edge)}")
            ok = False
            continue
        for key in edge:
            if key not in _EDGE_KEYS:
                add(f"{path}.{key}", f"unknown key '{key}' on an edge")
        src, dst = edge.get("source"), edge.get("target")
        for field, ref in (("source", src), ("target", dst)):
            if not isinstance(ref, str) or ref not in seen_ids:
                add(f"{path}.{field}", f"edge {field} {json.dumps(ref)} is not a node of this flow")
                ok = False
            elif ref not in nodes:
                ok = False  # that node's own problem is already reported
        if not (isinstance(src, str) and src in nodes and isinstance(dst, str) and dst in nodes):
            continue
        if src == dst:
            add(path, f"edge from '{src}' to itself; a flow must be acyclic")
            ok = False
            continue
        source, target = nodes[src][0], nodes[dst][0]
        out = _resolve_output(edge.get("source_output"), source, f"{path}.source_output", add)
        inp = _resolve_input(edge.get("target_input"), target, f"{path}.target_input", add)
        if out is None or inp is None:
            ok = False
            continue
        if (dst, inp) in taken:
            add(
                path,
                f"input '{inp}' of node '{dst}' is already fed by $.edges[{taken[(dst, inp)]}]; "
                "an input takes one edge",
            )
            ok = False
            continue
        taken[(dst, inp)] = i
        edges.append(Edge(src, dst, out, inp))
    return edges if ok else None


def _resolve_output(name, node: _NodeInfo, path, add) -> str | None:
    outputs = node.component.outputs
    if name is None:
        if len(outputs) == 1:
            return outputs[0]
        add(path, f"node '{node.id}' ({node.type}) has outputs {', '.join(outputs)}; "
            "set source_output to one of them")
        return None
    if name not in outputs:
        add(path, f"node '{node.id}' ({node.type}) has no output '{name}' "
            f"(outputs: {', '.join(outputs) or 'none'})")
        return None
    return name


def _resolve_input(name, node: _NodeInfo, path, add) -> str | None:
    inputs = list(node.inputs)
    if name is None:
        required = [p.name for p in node.inputs.values() if p.required]
        if len(inputs) == 1:
            return inputs[0]
        if len(required) == 1:  # optional inputs must be named; the required one is implied
            return required[0]
        if not inputs:
            add(path, f"node '{node.id}' ({node.type}) takes no inputs")
        else:
            add(path, f"node '{node.id}' ({node.type}) has inputs {', '.join(inputs)}; "
                "set target_input to one of them")
        return None
    if name not in node.inputs:
        add(path, f"node '{node.id}' ({node.type}) has no input '{name}' "
            f"(inputs: {', '.join(inputs) or 'none'})")
        return None
    return name


def _check_graph(nodes, edges: list[Edge], add) -> None:
    fed = {(e.target, e.target_input) for e in edges}
    for info, i in nodes.values():
        for port in info.inputs.values():
            if port.required and (info.id, port.name) not in fed:
                add(
                    f"$.nodes[{i}]",
                    f"required input '{port.name}' of node '{info.id}' ({info.type}) is not "
                    f"connected; add an edge with target '{info.id}' and target_input "
                    f"'{port.name}'",
                )
    kinds = {info.component.kind for info, _ in nodes.values()}
    if "input" not in kinds:
        add("$.nodes", "the flow has no input node (add a ChatInput or TextInput)")
    if "output" not in kinds:
        add("$.nodes", "the flow has no output node (add a ChatOutput or TextOutput)")
    cycle = find_cycle(list(nodes), [(e.source, e.target) for e in edges])
    if cycle:
        add("$.edges", "cycle: " + " → ".join([*cycle, cycle[0]]) + "; a flow must be acyclic")


def find_cycle(node_ids: list[str], pairs: list[tuple[str, str]]) -> list[str] | None:
    """Return the nodes of one cycle in order, or None when the graph is acyclic."""
    succ: dict[str, list[str]] = {n: [] for n in node_ids}
    for a, b in pairs:
        succ[a].append(b)
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(node_ids, white)
    for root in node_ids:
        if color[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        color[root] = grey
        while stack:
            node, idx = stack[-1]
            if idx < len(succ[node]):
                stack[-1] = (node, idx + 1)
                nxt = succ[node][idx]
                if color[nxt] == grey:
                    return path[path.index(nxt):]
                if color[nxt] == white:
                    color[nxt] = grey
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                color[node] = black
                stack.pop()
                path.pop()
    return None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean", int: "a number", float: "a number"}.get(type(value), "a value")
