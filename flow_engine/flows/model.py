"""Typed, immutable flow definitions (the JSON shape is in DESIGN.md "Flow definition")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    source_output: str
    target_input: str


@dataclass(frozen=True)
class FlowDefinition:
    """A validated flow graph. Edges carry resolved port names (defaults filled in)."""

    id: str
    name: str
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def node(self, node_id: str) -> Node:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)


@dataclass(frozen=True)
class FlowVersion:
    """One immutable version of a flow; ``(flow_id, version)`` identifies compiled graphs."""

    flow_id: str
    version: int
    definition: FlowDefinition

    @property
    def key(self) -> tuple[str, int]:
        return (self.flow_id, self.version)
