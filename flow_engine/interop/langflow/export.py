"""A Flowgate flow in LangFlow's export shape (the reader's docstring shows it), for
``GET /api/v1/flows/{id}/export?format=langflow``: import it in LangFlow with "Import" or
``POST /api/v1/flows/upload/``.

Nodes become the LangFlow components the importer maps back (ChatInput, TextInput,
ChatOutput, TextOutput, Prompt Template, LanguageModelComponent or OpenAIModel when a
``base_url`` is set, Agent, Message History, Parser, Split Text, Calculator, Run Flow for a
FlowTool, Knowledge, If-Else for a ConditionalRouter). A ChatPromptTemplate that feeds a
ChatModel becomes that model's system message and input, as LangFlow draws it; a
ChatHistory feeding an Agent becomes the agent's ``n_messages``; a StrOutputParser is left
out (LangFlow's messages are text already). Types with no LangFlow component keep their
Flowgate type name, their params as fields and their ports as handles; a note at the top of
the canvas lists them and every other approximation.

**No node carries ``template.code``** (Flowgate has no LangFlow component source to give,
and a flow must never carry code). What LangFlow 1.13 does with that, read in its source
(langflow-base and lfx 1.13.0): saving or uploading takes the JSON as it is; the editor
draws each node from ``data.node.template`` and ``outputs``; neither the code-hash checks
(``lfx.utils.flow_validation._get_invalid_components`` looks only at nodes that *have*
code) nor the editor's "outdated component" check (it compares the node's code with the
server's only when both exist) flag a node without code, so the flow opens as it is
drawn. Building a node needs its code, though: ``lfx.interface.initialize.loading.
instantiate_class`` reads ``code`` from the node's params, so running the flow in LangFlow
fails until each node is replaced by the same component from LangFlow's sidebar (its
fields can be copied over). The export is a faithful drawing of the flow, not a runnable
LangFlow flow.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from flow_engine.flows.model import Edge, FlowDefinition, Node

MESSAGE = ["Message"]
ANY_IN = ["Message", "Data", "JSON", "DataFrame", "Table"]
# Flowgate type → (LangFlow type, display name, {Flowgate output: (LangFlow output, types)},
#                  {Flowgate input: (LangFlow field, input types)})
SIMPLE: dict[str, tuple[str, str, dict[str, tuple[str, list[str]]], dict[str, tuple[str, list[str]]]]] = {
    "ChatInput": ("ChatInput", "Chat Input", {"message": ("message", MESSAGE)}, {}),
    "TextInput": ("TextInput", "Text Input", {"message": ("text", MESSAGE)}, {}),
    "ChatOutput": ("ChatOutput", "Chat Output", {"message": ("message", MESSAGE)},
                   {"message": ("input_value", ANY_IN)}),
    "TextOutput": ("TextOutput", "Text Output", {"message": ("text", MESSAGE)},
                   {"message": ("input_value", MESSAGE)}),
    "TextSplitter": ("SplitText", "Split Text", {"chunks": ("dataframe", ["Table"])},
                     {"text": ("data_inputs", ANY_IN)}),
    "Parser": ("ParserComponent", "Parser", {"text": ("parsed_text", MESSAGE)},
               {"data": ("input_data", ["DataFrame", "Table", "Data", "JSON"])}),
    "ChatHistory": ("Memory", "Message History", {"history": ("messages_text", MESSAGE)}, {}),
    "KnowledgeRetriever": ("Knowledge", "Knowledge", {"documents": ("retrieve_data", ["Table"])},
                           {"query": ("search_query", MESSAGE)}),
    "ConditionalRouter": ("ConditionalRouter", "If-Else",
                          {"true": ("true_result", MESSAGE), "false": ("false_result", MESSAGE)},
                          {"input": ("input_text", MESSAGE)}),
    "Calculator": ("CalculatorComponent", "Calculator", {"tool": ("component_as_tool", ["Tool"])}, {}),
    "FlowTool": ("RunFlow", "Run Flow", {"tool": ("component_as_tool", ["Tool"])}, {}),
    "Agent": ("Agent", "Agent", {"response": ("response", MESSAGE)},
              {"input": ("input_value", MESSAGE), "system_prompt": ("system_prompt", MESSAGE)}),
}
_OPERATORS = {"contains": "contains", "equals": "equals", "starts_with": "starts with",
              "regex": "regex"}


def to_langflow(definition: FlowDefinition, *, flow_id: str, version: int) -> dict[str, Any]:
    """The LangFlow export of a validated definition (see the module docstring)."""
    return _Exporter(definition, flow_id, version).run()


class _Exporter:
    def __init__(self, definition: FlowDefinition, flow_id: str, version: int) -> None:
        self.d = definition
        self.flow_id, self.version = flow_id, version
        self.into: dict[str, list[Edge]] = defaultdict(list)
        self.out_of: dict[str, list[Edge]] = defaultdict(list)
        for e in definition.edges:
            self.into[e.target].append(e)
            self.out_of[e.source].append(e)
        self.nodes: list[dict[str, Any]] = []
        self.edges: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.ports_in: dict[tuple[str, str], tuple[str, str, str, list[str]]] = {}
        self.ports_out: dict[tuple[str, str], tuple[str, str, str, list[str]]] = {}
        self.skip: set[str] = set()
        self.alias: dict[str, tuple[str, str]] = {}  # skipped node → the output it passes on
        self.layer = _layers(definition)

    def run(self) -> dict[str, Any]:
        self._plan_folds()
        for node in self.d.nodes:
            if node.id not in self.skip:
                self._node(node)
        for e in self.d.edges:
            self._edge(e)
        if self.notes:
            self._note()
        return {"name": self.d.name, "description": self.d.description, "is_component": False,
                "tags": [], "data": {"nodes": self.nodes, "edges": self.edges,
                                     "viewport": {"x": 0, "y": 0, "zoom": 0.8}}}

    # -- what LangFlow draws differently ---------------------------------------------------

    def _plan_folds(self) -> None:
        types = {n.id: n.type for n in self.d.nodes}
        for node in self.d.nodes:
            feeds = self.out_of[node.id]
            if node.type == "StrOutputParser" and self.into[node.id]:
                src = self.into[node.id][0]
                self.skip.add(node.id)
                self.alias[node.id] = (src.source, src.source_output)
            elif _folds(node, feeds, types):
                self.skip.add(node.id)

    def _resolve(self, source: str, output: str) -> tuple[str, str]:
        while source in self.alias:
            source, output = self.alias[source]
        return source, output

    # -- nodes -----------------------------------------------------------------------------

    def _node(self, node: Node) -> None:
        p = node.params
        if node.type == "ChatModel":
            self._model(node)
        elif node.type == "PromptTemplate":
            self._prompt(node.id, p["template"], {name: name for name in _fields(p["template"])})
        elif node.type == "ChatPromptTemplate":
            text = "\n\n".join(t for t in (p.get("system", ""), p["human"]) if t)
            self._prompt(node.id, text, {name: name for name in _fields(text)})
            self.notes.append(f"'{node.id}' was a Chat Prompt Template (system and user message); "
                              "here its two parts are one prompt")
        elif node.type in SIMPLE:
            lf_type, display, outs, ins = SIMPLE[node.type]
            self._emit(node, lf_type, display, self._fields(node), outs, ins)
        else:
            self._generic(node)

    def _fields(self, node: Node) -> list[dict[str, Any]]:
        p, t = node.params, node.type
        if t in ("ChatInput", "TextInput"):
            return [_f("input_value", p.get("input_value", ""), multiline=True)]
        if t in ("ChatOutput", "TextOutput"):
            return [_f("input_value", "", input_types=SIMPLE[t][3]["message"][1])]
        if t == "TextSplitter":
            seps = p.get("separators") or ["\n"]
            return [_f("chunk_size", p.get("chunk_size", 1000), "int"),
                    _f("chunk_overlap", p.get("chunk_overlap", 200), "int"),
                    _f("separator", seps[0]), _f("data_inputs", "", "other", input_types=ANY_IN)]
        if t == "Parser":
            stringify = p.get("mode") == "stringify"
            return [_f("mode", "Stringify" if stringify else "Parser", "tab"),
                    _f("pattern", p.get("template", "{text}"), multiline=True),
                    _f("sep", p.get("sep", "\n")),
                    _f("input_data", "", "other", input_types=["DataFrame", "Table", "Data", "JSON"])]
        if t == "ChatHistory":
            return [_f("mode", "Retrieve", "tab"), _f("n_messages", p.get("max_messages", 20), "int")]
        if t == "KnowledgeRetriever":
            return [_f("mode", "Retrieve", "tab"), _f("knowledge_base", p.get("knowledge_id", "")),
                    _f("top_k", p.get("k", 4), "int"), _f("search_query", "", input_types=MESSAGE)]
        if t == "ConditionalRouter":
            return [_f("input_text", "", input_types=MESSAGE),
                    _f("operator", _OPERATORS.get(p.get("operator", "contains"), "contains")),
                    _f("match_text", p.get("pattern", "")),
                    _f("case_sensitive", p.get("case_sensitive", False), "bool")]
        if t == "Calculator":
            return [_tools_metadata(p.get("name", "calculator"), p.get("description", ""))]
        if t == "FlowTool":
            return [_f("flow_name_selected", p.get("flow_id", "")),
                    _tools_metadata(p.get("name") or f"flow_{p.get('flow_id', '')}",
                                    p.get("description", ""))]
        if t == "Agent":
            return self._agent_fields(node)
        return []

    def _agent_fields(self, node: Node) -> list[dict[str, Any]]:
        p = node.params
        history = [e for e in self.into[node.id] if e.target_input == "history"]
        n_messages = 0
        if history and history[0].source in self.skip:
            n_messages = self.d.node(history[0].source).params.get("max_messages", 20)
        elif history:
            self.notes.append(f"the history input of Agent '{node.id}' is not drawn")
        if p.get("provider") == "echo":
            self.notes.append(f"Agent '{node.id}' used Flowgate's offline echo model")
        fields = [_f("model", [{"name": p.get("model", "gpt-4o-mini"), "provider": "OpenAI"}],
                     "model"),
                  _f("system_prompt", p.get("system_prompt", ""), multiline=True, input_types=MESSAGE),
                  _f("input_value", "", input_types=MESSAGE),
                  _f("max_iterations", p.get("max_iterations", 10), "int"),
                  _f("n_messages", n_messages, "int"),
                  _f("tools", "", "other", input_types=["Tool"]),
                  _f("add_calculator_tool", False, "bool")]
        for name in ("temperature", "max_tokens"):
            if name in p:
                fields.append(_f(name, p[name], "float" if name == "temperature" else "int"))
        return fields

    def _model(self, node: Node) -> None:
        p = node.params
        folded = [e for e in self.into[node.id] if e.source in self.skip]
        system_value, fields = "", []
        if folded:
            prompt = self.d.node(folded[0].source)
            human_field = _single_field(prompt.params["human"])
            system = prompt.params.get("system", "")
            for e in self.into[prompt.id]:  # edges into the folded prompt go to the model
                if e.target_input == human_field:
                    self.ports_in[(prompt.id, e.target_input)] = (node.id, "input_value", "str", MESSAGE)
            fed_by = _single_field(system)
            if _fields(system) == [] and system:
                system_value = system.replace("{{", "{").replace("}}", "}")
            elif fed_by is not None:  # "{v}": v's edge goes into the system message itself
                self.ports_in[(prompt.id, fed_by)] = (node.id, "system_message", "str", MESSAGE)
            elif system:
                self._prompt(f"{prompt.id}", system, {n: n for n in _fields(system)})
                for name in _fields(system):
                    self.ports_in[(prompt.id, name)] = (prompt.id, name, "str", ["Message", "Text"])
                self._link((prompt.id, "prompt", "Prompt Template", MESSAGE),
                           (node.id, "system_message", "str", MESSAGE))
        if p.get("provider") == "echo":
            self.notes.append(f"'{node.id}' used Flowgate's offline echo model")
        if p.get("base_url"):
            lf_type, display = "OpenAIModel", "OpenAI"
            fields = [_f("model_name", p.get("model", "gpt-4o-mini")),
                      _f("openai_api_base", p["base_url"]),
                      _f("api_key", "", password=True)]
        else:
            lf_type, display = "LanguageModelComponent", "Language Model"
            fields = [_f("model", [{"name": p.get("model", "gpt-4o-mini"), "provider": "OpenAI"}],
                         "model"), _f("api_key", "", password=True)]
        fields += [_f("input_value", "", input_types=MESSAGE),
                   _f("system_message", system_value, multiline=True, input_types=MESSAGE),
                   _f("stream", True, "bool")]
        if "temperature" in p:
            fields.append(_f("temperature", p["temperature"], "slider"))
        if "max_tokens" in p:
            fields.append(_f("max_tokens", p["max_tokens"], "int"))
        self._emit(node, lf_type, display, fields,
                   {"message": ("text_output", MESSAGE)}, {"prompt": ("input_value", MESSAGE)},
                   extra_outputs=[("model_output", "Language Model", ["LanguageModel"])])

    def _prompt(self, node_id: str, template: str, variables: dict[str, str]) -> None:
        fields = [_f("template", template, "prompt"), _f("use_double_brackets", False, "bool")]
        fields += [_f(v, "", input_types=["Message", "Text"]) for v in variables]
        node = self._emit_raw(node_id, "Prompt Template", "Prompt Template", fields,
                              [("prompt", "Prompt", MESSAGE)])
        node["data"]["node"]["custom_fields"] = {"template": list(variables)}
        for fg_input, field in variables.items():
            self.ports_in[(node_id, fg_input)] = (node_id, field, "str", ["Message", "Text"])
        self.ports_out[(node_id, "prompt")] = (node_id, "prompt", "Prompt Template", MESSAGE)

    def _generic(self, node: Node) -> None:
        fields = [_f(k, v if isinstance(v, str | int | float | bool) else json.dumps(v), _kind(v))
                  for k, v in node.params.items()]
        ins = {e.target_input: (e.target_input, ANY_IN) for e in self.into[node.id]}
        fields += [_f(name, "", "other", input_types=ANY_IN) for name in ins]
        outs = {e.source_output: (e.source_output, MESSAGE) for e in self.out_of[node.id]}
        self._emit(node, node.type, node.type, fields, outs or {"output": ("output", MESSAGE)}, ins)
        self.notes.append(f"'{node.id}' is a Flowgate {node.type}: LangFlow has no such component")

    def _emit(self, node: Node, lf_type: str, display: str, fields: list[dict[str, Any]],
              outs: dict[str, tuple[str, list[str]]], ins: dict[str, tuple[str, list[str]]],
              extra_outputs: list[tuple[str, str, list[str]]] | None = None) -> None:
        outputs = [(name, name.replace("_", " ").title(), types) for name, types in outs.values()]
        self._emit_raw(node.id, lf_type, display, fields, outputs + (extra_outputs or []),
                       tool_mode=lf_type in ("CalculatorComponent", "RunFlow"))
        for fg_out, (name, types) in outs.items():
            self.ports_out[(node.id, fg_out)] = (node.id, name, lf_type, types)
        for fg_in, (name, types) in ins.items():
            self.ports_in[(node.id, fg_in)] = (node.id, name, "other" if name in (
                "tools", "input_data", "data_inputs") else "str", types)
        if node.type == "Agent":
            for e in self.into[node.id]:
                if e.target_input.startswith("tools."):
                    self.ports_in[(node.id, e.target_input)] = (node.id, "tools", "other", ["Tool"])

    def _emit_raw(self, node_id: str, lf_type: str, display: str, fields: list[dict[str, Any]],
                  outputs: list[tuple[str, str, list[str]]], tool_mode: bool = False) -> dict[str, Any]:
        layer, row = self.layer.get(node_id, (0, len(self.nodes)))
        node = {"id": node_id, "type": "genericNode",
                "position": {"x": 80 + 420 * layer, "y": 80 + 340 * row},
                "data": {"id": node_id, "type": lf_type, "node": {
                    "display_name": display, "description": "", "documentation": "",
                    "base_classes": sorted({t for _n, _d, types in outputs for t in types}),
                    "template": {"_type": "Component", **{f["name"]: f for f in fields}},
                    "field_order": [f["name"] for f in fields],
                    "outputs": [{"name": n, "display_name": d, "types": types, "selected": types[0],
                                 "method": "", "cache": True, "allows_loop": False,
                                 "tool_mode": tool_mode, "value": "__UNDEFINED__"}
                                for n, d, types in outputs],
                    "custom_fields": {}, "output_types": [], "edited": False, "frozen": False,
                    "beta": False, "legacy": False, "pinned": False, "tool_mode": tool_mode,
                    "metadata": {"exported_by": "flowgate"}}}}
        self.nodes.append(node)
        return node

    # -- edges ------------------------------------------------------------------------------

    def _edge(self, e: Edge) -> None:
        if e.target in self.skip and self.d.node(e.target).type != "ChatPromptTemplate":
            return  # into a folded ChatHistory or a skipped parser: drawn otherwise
        source, output = self._resolve(e.source, e.source_output)
        if source in self.skip:
            return  # a folded ChatHistory or ChatPromptTemplate: drawn as fields
        src = self.ports_out.get((source, output))
        dst = self.ports_in.get((e.target, e.target_input))
        if src is not None and dst is not None:
            self._link(src, dst)

    def _link(self, src: tuple[str, str, str, list[str]], dst: tuple[str, str, str, list[str]]) -> None:
        (s_id, s_name, s_type, s_types), (t_id, t_field, t_kind, t_types) = src, dst
        source = {"dataType": s_type, "id": s_id, "name": s_name, "output_types": s_types}
        target = {"fieldName": t_field, "id": t_id, "inputTypes": t_types, "type": t_kind}
        self.edges.append({
            "id": f"reactflow__edge-{s_id}{_handle(source, ',', ':')}-{t_id}{_handle(target, ',', ':')}",
            "source": s_id, "target": t_id, "sourceHandle": _handle(source), "targetHandle": _handle(target),
            "data": {"sourceHandle": source, "targetHandle": target},
            "animated": False, "className": "", "selected": False})

    def _note(self) -> None:
        text = (f"# Exported from Flowgate\nFlow `{self.flow_id}`, version {self.version}. Nodes "
                "carry no component code: replace each one with the same component from the "
                "sidebar to run the flow in LangFlow.\n\n" + "\n".join(f"- {n}" for n in self.notes))
        self.nodes.insert(0, {"id": "note-flowgate", "type": "noteNode",
                              "position": {"x": -380, "y": 80},
                              "data": {"id": "note-flowgate", "type": "note", "node": {
                                  "description": text, "display_name": "", "documentation": "",
                                  "template": {"backgroundColor": "neutral"}}}})


def _folds(node: Node, feeds: list[Edge], types: dict[str, str]) -> bool:
    """Drawn as fields of the node it feeds: a ChatHistory feeding Agents' history, a
    ChatPromptTemplate whose user message is one field, feeding one ChatModel."""
    if node.type == "ChatHistory":
        return bool(feeds) and all(types[e.target] == "Agent" and e.target_input == "history"
                                   for e in feeds)
    return (node.type == "ChatPromptTemplate" and len(feeds) == 1
            and types[feeds[0].target] == "ChatModel"
            and _single_field(node.params.get("human", "")) is not None)


def _f(name: str, value: Any, type_: str = "str", *, input_types: list[str] | None = None,
       multiline: bool = False, password: bool = False) -> dict[str, Any]:
    field: dict[str, Any] = {"name": name, "display_name": name.replace("_", " ").title(),
                             "type": type_, "value": value, "show": True, "advanced": False,
                             "required": False, "list": False, "dynamic": False, "info": "",
                             "placeholder": "", "title_case": False, "trace_as_metadata": True}
    if input_types is not None:
        field["input_types"] = input_types
    if multiline:
        field["multiline"] = True
    if password:
        field.update(password=True, load_from_db=False)
    return field


def _tools_metadata(name: str, description: str) -> dict[str, Any]:
    return _f("tools_metadata", [{"name": name, "display_name": name, "description": description,
                                  "status": True, "tags": [name]}], "tools")


def _handle(data: dict[str, Any], item: str = ", ", key: str = ": ") -> str:
    return json.dumps(data, separators=(item, key)).replace('"', "œ")


def _fields(template: str) -> list[str]:
    from flow_engine.flows.templates import template_fields

    return template_fields(template)[0]


def _single_field(template: str) -> str | None:
    names = _fields(template)
    return names[0] if len(names) == 1 and template == "{" + names[0] + "}" else None


def _kind(value: Any) -> str:
    return "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else (
        "float" if isinstance(value, float) else "str")


def _layers(definition: FlowDefinition) -> dict[str, tuple[int, int]]:
    """(column, row) of each node: its distance from the flow's start, for a tidy canvas."""
    depth = {n.id: 0 for n in definition.nodes}
    for _ in definition.nodes:  # longest path; flows are acyclic and small
        for e in definition.edges:
            depth[e.target] = max(depth[e.target], depth[e.source] + 1)
    rows: dict[int, int] = defaultdict(int)
    out = {}
    for n in definition.nodes:
        out[n.id] = (depth[n.id], rows[depth[n.id]])
        rows[depth[n.id]] += 1
    return out
