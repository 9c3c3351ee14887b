"""What changed between two versions of a flow: nodes added, removed and changed (type and
each param ``{from, to}``), edges added and removed, and the top-level fields. Pure: it
reads two stored definitions (plain dicts) and returns plain data, for
``GET /flows/{id}/diff`` and ``flowgate flows diff``.

Nodes are matched by id; an edge is its ``(source, source_output, target, target_input)``
as written. A param present in one version only is shown with ``null`` on the other side
(``{"from": null, "to": 0.2}``): the default then applies there.
"""

from __future__ import annotations

from typing import Any

FIELDS = ("name", "description", "tweakable")
_ABSENT = None


def diff_definitions(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    old_nodes, new_nodes = _nodes(before), _nodes(after)
    changed = []
    for node_id in [n for n in new_nodes if n in old_nodes]:
        change = _node_change(old_nodes[node_id], new_nodes[node_id])
        if change:
            changed.append({"id": node_id, **change})
    old_edges, new_edges = _edges(before), _edges(after)
    fields = {name: {"from": before.get(name), "to": after.get(name)}
              for name in FIELDS if before.get(name) != after.get(name)}
    return {
        "fields": fields,
        "nodes": {
            "added": [_node_summary(new_nodes[n]) for n in new_nodes if n not in old_nodes],
            "removed": [_node_summary(old_nodes[n]) for n in old_nodes if n not in new_nodes],
            "changed": changed,
        },
        "edges": {
            "added": [_edge_json(e) for e in new_edges if e not in old_edges],
            "removed": [_edge_json(e) for e in old_edges if e not in new_edges],
        },
    }


def is_empty(diff: dict[str, Any]) -> bool:
    return not (diff["fields"] or any(diff["nodes"].values()) or any(diff["edges"].values()))


def _nodes(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in definition.get("nodes") or [] if isinstance(n, dict) and "id" in n}


def _node_change(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    change: dict[str, Any] = {}
    if old.get("type") != new.get("type"):
        change["type"] = {"from": old.get("type"), "to": new.get("type")}
    old_params, new_params = old.get("params") or {}, new.get("params") or {}
    params = {name: {"from": old_params.get(name, _ABSENT), "to": new_params.get(name, _ABSENT)}
              for name in sorted(set(old_params) | set(new_params))
              if old_params.get(name, _ABSENT) != new_params.get(name, _ABSENT)
              or (name in old_params) != (name in new_params)}
    if params:
        change["params"] = params
    return change


def _node_summary(node: dict[str, Any]) -> dict[str, Any]:
    return {"id": node["id"], "type": node.get("type"), "params": node.get("params") or {}}


def _edges(definition: dict[str, Any]) -> list[tuple]:
    edges = []
    for e in definition.get("edges") or []:
        if isinstance(e, dict):
            key = (e.get("source"), e.get("source_output"), e.get("target"), e.get("target_input"))
            if key not in edges:
                edges.append(key)
    return edges


def _edge_json(edge: tuple) -> dict[str, Any]:
    source, source_output, target, target_input = edge
    out = {"source": source, "target": target}
    if source_output is not None:
        out["source_output"] = source_output
    if target_input is not None:
        out["target_input"] = target_input
    return out
