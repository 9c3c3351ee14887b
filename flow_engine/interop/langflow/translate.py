"""A LangFlow export → a Flowgate definition and a report of what became of every node,
field and edge. Pure: no Flask, no store, no network, and nothing from the export is ever
executed, imported or evaluated — a node's ``template.code`` is a string that is only
looked at to say that it was not imported.

Every problem is reported at once (:class:`LangFlowImportError`, 422): components with no
Flowgate equivalent (each with its path ``$.flow.data.nodes[3]``, type, display name and
what to do), malformed parts of the export, and — once translated — the Flowgate
definition's own validation problems, moved to the LangFlow path they came from
(``$.nodes[2].params.base_url`` → ``$.flow.data.nodes[5].data.node.template.openai_api_base.value``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flow_engine.components.base import ComponentRegistry
from flow_engine.errors import FlowInvalid, Problem
from flow_engine.interop.langflow import mappers, model_mappers
from flow_engine.interop.langflow.builder import Builder, Unsupported
from flow_engine.interop.langflow.reader import LfNode, read_export

MAPPERS: dict[str, mappers.Mapper] = {
    "ChatInput": mappers.chat_input, "TextInput": mappers.text_input,
    "ChatOutput": mappers.chat_output, "TextOutput": mappers.text_output,
    "Prompt": mappers.prompt, "Prompt Template": mappers.prompt,
    "parser": mappers.parser, "ParserComponent": mappers.parser,
    "SplitText": mappers.split_text, "Memory": mappers.memory,
    "MemoryBase": model_mappers.memory_base, "Knowledge": mappers.knowledge,
    "CalculatorComponent": mappers.calculator, "RunFlow": mappers.run_flow,
    "LanguageModelComponent": model_mappers.language_model,
    "OpenAIModel": model_mappers.language_model, "Agent": model_mappers.agent,
}
SUPPORTED = sorted(MAPPERS)
_SECRET_NAMES = {"api_key", "openai_api_key", "apikey", "token", "secret", "password"}
_NODE_PATH = re.compile(r"^\$\.nodes\[(\d+)\](?:\.params\.([^.\[]+))?")
_EDGE_PATH = re.compile(r"^\$\.edges\[(\d+)\]")


class LangFlowImportError(FlowInvalid):
    """The export cannot become a Flowgate flow; ``problems`` lists everything at once and
    ``unsupported`` the components with no Flowgate equivalent."""

    def __init__(self, problems: list[Problem], unsupported: list[Unsupported]) -> None:
        super().__init__(problems)
        if unsupported:
            self.details["unsupported"] = [u.as_dict() for u in unsupported]
            n = len(unsupported)
            self.message = (f"{n} LangFlow component{'s' if n > 1 else ''} "
                            f"ha{'ve' if n > 1 else 's'} no Flowgate equivalent: "
                            + "; ".join(f"{u.path} ({u.langflow_type})" for u in unsupported[:5])
                            + (" …" if n > 5 else ""))
            self.args = (self.message,)


@dataclass
class Translation:
    definition: dict[str, Any]
    report: dict[str, Any]
    root: str
    origin: dict[str, tuple[str, dict[str, str]]]
    edge_origin: list[str]

    def locate(self, problems: list[Problem]) -> list[Problem]:
        """Problems of the Flowgate definition at the LangFlow paths they came from."""
        return [self._locate(p) for p in problems]

    def _locate(self, problem: Problem) -> Problem:
        path, message = problem.path, problem.message
        node_match = _NODE_PATH.match(path)
        if node_match:
            nodes = self.definition["nodes"]
            index, param = int(node_match.group(1)), node_match.group(2)
            node = nodes[index] if index < len(nodes) else None
            if node is not None and node["id"] in self.origin:
                lf_path, params = self.origin[node["id"]]
                where = f"Flowgate {node['type']} '{node['id']}'" + (
                    f", param '{param}'" if param else "")
                return Problem(params.get(param or "", lf_path), f"{message} [{where}]")
        edge_match = _EDGE_PATH.match(path)
        if edge_match and int(edge_match.group(1)) < len(self.edge_origin):
            return Problem(self.edge_origin[int(edge_match.group(1))], message)
        top = {"$.name": f"{self.root}.name", "$.description": f"{self.root}.description",
               "$.edges": f"{self.root}.data.edges", "$.nodes": f"{self.root}.data.nodes",
               "$": self.root}
        return Problem(top.get(path, path), message)


def translate(export: Any, registry: ComponentRegistry, *, root: str = "$.flow") -> Translation:
    """The Flowgate definition of ``export`` (not yet validated: see :meth:`Translation.locate`
    for its problems), or :class:`LangFlowImportError` with every problem of the export."""
    flow, problems = read_export(export, root)
    if flow is None:
        raise LangFlowImportError(problems, [])
    b = Builder(flow, registry)
    b.problems.extend(problems)
    for node in flow.nodes:
        if node.is_note:
            b.drop(node, "a note: notes are not part of a Flowgate flow")
        elif node.is_group:
            b.unsupported(node, "a group of components: ungroup it in LangFlow and export again")
        elif node.type not in MAPPERS:
            b.unsupported(node, mappers.what_to_do(node, SUPPORTED))
        else:
            MAPPERS[node.type](node, b)
    _map_edges(b)
    for node in flow.nodes:
        if b.report(node).status in ("mapped", "merged"):
            _account_fields(node, b)
    if b.problems:
        raise LangFlowImportError(b.problems, b.unsupported_nodes)
    name = (flow.name or "").strip()[:200] or "Imported LangFlow flow"
    definition = {"name": name, "description": flow.description, "nodes": b.nodes,
                  "edges": b.edges}
    report = {
        "source": {"format": "langflow", "name": flow.name, "nodes": len(flow.nodes),
                   "edges": len(flow.edges)},
        "nodes": [b.report(node).as_dict() for node in flow.nodes],
        "edges": b.edge_reports,
        "warnings": b.warnings,
    }
    return Translation(definition, report, root, b.origin, b.edge_origin)


def _map_edges(b: Builder) -> None:
    for edge in b.flow.edges:
        entry: dict[str, Any] = {"path": edge.path, "source": edge.source, "target": edge.target,
                                 "output": edge.output}
        entry.update({"into_output": edge.loop_into} if edge.loop_into else {"field": edge.field})
        b.edge_reports.append(entry)
        src, dst = b.by_id.get(edge.source), b.by_id.get(edge.target)
        if src is None or dst is None:
            b.problem(edge.path, f"the edge joins '{edge.source}' and '{edge.target}', and "
                                 f"'{edge.source if src is None else edge.target}' is no node "
                                 "of the export")
            entry["status"] = "dropped"
            continue
        statuses = (b.report(src).status, b.report(dst).status)
        if {"unsupported", "invalid", "dropped"} & set(statuses):
            entry.update(status="dropped", reason="a node it joins was not imported")
            continue
        if edge.loop_into:  # its Loop node is reported already (unsupported) when it has one
            b.problem(edge.path, f"a loop-back edge from {src.label} into output "
                                 f"'{edge.loop_into}' of {dst.label}: Flowgate flows are "
                                 "acyclic; loop in your app, or let an Agent call a FlowTool")
            entry["status"] = "dropped"
            continue
        if statuses[0] == "merged" and edge.output == "model_output":
            entry.update(status="merged", reason="the agent took this model's settings")
            continue
        rule = b.inputs.get((edge.target, edge.field))
        target = rule(edge) if callable(rule) else rule
        source = b.outputs.get((edge.source, edge.output))
        if target is None or source is None:
            what = (f"field '{edge.field}' of {dst.label} ({dst.type})" if target is None
                    else f"output '{edge.output}' of {src.label} ({src.type})")
            b.problem(edge.path, f"{what} has no Flowgate equivalent; remove the edge or "
                                 "connect another field")
            entry["status"] = "dropped"
            continue
        b.link(source.node, target.node, target.port, edge.path, source.port)
        b.carry(dst, edge.field, node=target.node, input=target.port or "")
        entry.update(status="mapped", flowgate={"source": source.node, "target": target.node,
                                                "target_input": target.port})


def _account_fields(node: LfNode, b: Builder) -> None:
    """Warn about keys and edited code; every field not carried is reported as ignored."""
    report = b.report(node)
    accounted = {c["field"] for c in report.carried} | {i["field"] for i in report.ignored}
    for name in node.fields():
        spec = node.template[name]
        secret = (spec.get("password") is True or spec.get("_input_type") == "SecretStrInput"
                  or name.lower() in _SECRET_NAMES)
        if secret:
            value = spec.get("value")
            if isinstance(value, str) and value.strip():
                how = (f"refers to LangFlow's global variable '{value.strip()[:64]}'"
                       if spec.get("load_from_db") else "holds a key")
                b.warn(node, "api_key_dropped",
                       f"an API key in node {node.label} was dropped (field '{name}' {how}) — "
                       "keys come from the engine's settings (OPENAI_API_KEY)",
                       path=node.field_path(name))
            b.ignore(node, name, "keys come from the engine's settings, never from a flow")
        elif name not in accounted:
            b.ignore(node, name, "not carried: no Flowgate equivalent")
    if node.edited or (node.has_code and node.type == "CustomComponent"):
        made = ", ".join(f"{f['type']} '{f['id']}'" for f in report.flowgate) or "nothing"
        b.warn(node, "custom_code", f"custom code in node {node.label} was not imported: "
                                    f"Flowgate runs its own {made}, never code from an export")
