"""LangFlow components → Flowgate nodes: inputs and outputs, prompts, parsers, splitters,
message history, knowledge and the calculator (models and agents: ``model_mappers.py``).

Each mapper reads one LangFlow node and tells the :class:`~.builder.Builder` which Flowgate
node(s) it becomes, which of its fields became which params, and where edges into its
fields and out of its outputs go. Fields a mapper does not carry are reported as ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flow_engine.components.tools import tool_name
from flow_engine.interop.langflow.builder import Builder, Target
from flow_engine.interop.langflow.reader import LfNode
from flow_engine.interop.langflow.templates import to_flowgate, variables

Mapper = Callable[[LfNode, Builder], None]
BOOKKEEPING = "LangFlow's message bookkeeping; Flowgate keeps turns itself for flows with history"


def clamp(value: int | float | None, low: int, high: int, default: int | None = None) -> int | None:
    if value is None:
        return default
    return max(low, min(high, int(value)))


def unescape(text: str) -> str:
    """LangFlow writes separators such as ``\\n`` as two characters."""
    return text.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")


def outputs_to(node: LfNode, b: Builder, fid: str, port: str | None = None) -> None:
    for name in node.output_names() or ["message"]:
        b.output(node, name, fid, port)


def tool_meta(node: LfNode) -> dict[str, str]:
    """The name and description LangFlow's tool mode gave the component (``tools_metadata``)."""
    entries = node.value("tools_metadata")
    if isinstance(entries, list):
        for entry in entries:
            if isinstance(entry, dict) and entry.get("status", True) is not False:
                out = {}
                if isinstance(entry.get("name"), str) and entry["name"].strip():
                    out["name"] = tool_name(entry["name"].strip())
                if isinstance(entry.get("description"), str) and entry["description"].strip():
                    out["description"] = entry["description"].strip()[:2000]
                return out
    return {}


def feeds_tools(node: LfNode, b: Builder) -> bool:
    return any(e.output == "component_as_tool" for e in b.outgoing.get(node.id, []))


# -- inputs and outputs ------------------------------------------------------------------------


def _input_node(type_: str) -> Mapper:
    def mapper(node: LfNode, b: Builder) -> None:
        value = node.text("input_value")
        fid = b.add(node, type_, {"input_value": value} if value else {},
                    carried={"input_value": "input_value"} if value else {})
        outputs_to(node, b, fid)
        for name in ("should_store_message", "sender", "sender_name", "session_id", "context_id"):
            b.ignore(node, name, BOOKKEEPING)
        if node.value("files"):
            b.warn(node, "files_dropped", f"files attached to {node.label} were not imported; "
                                          "upload them to a knowledge base instead")
    return mapper


def _output_node(type_: str) -> Mapper:
    def mapper(node: LfNode, b: Builder) -> None:
        fid = b.add(node, type_, {})
        b.input(node, "input_value", Target(fid, "message"))
        outputs_to(node, b, fid)
        for name in ("should_store_message", "sender", "sender_name", "session_id", "context_id"):
            b.ignore(node, name, BOOKKEEPING)
        for name in ("data_template", "clean_data"):
            b.ignore(node, name, "Flowgate's outputs are the upstream value as text")
    return mapper


chat_input = _input_node("ChatInput")
text_input = _input_node("TextInput")
chat_output = _output_node("ChatOutput")
text_output = _output_node("TextOutput")


# -- prompts, parsers, splitters ---------------------------------------------------------------


def prompt(node: LfNode, b: Builder) -> None:
    template = node.text("template")
    mustache = node.flag("use_double_brackets")
    names, problems = variables(template, mustache)
    for problem in problems:
        b.problem(node.field_path("template"), f"the template of {node.label}: {problem}")
    if problems:
        b.drop(node, "its template cannot be converted", status="invalid")
        return
    connected = [name for name in names if b.fed(node, name)]
    static = {name: _text(node.value(name)) for name in names if name not in connected}
    text, _ = to_flowgate(template, mustache, static)
    fid = b.add(node, "PromptTemplate", {"template": text}, carried={"template": "template"})
    for name in connected:
        b.input(node, name, Target(fid, name))
    for name in static:
        b.carry(node, name, node=fid, note="no edge feeds it: its value is written into the template")
    if mustache:
        b.carry(node, "use_double_brackets", node=fid, note="{{name}} became {name}")
    outputs_to(node, b, fid)
    b.ignore(node, "tool_placeholder", "tool mode of a prompt is not supported")


def parser(node: LfNode, b: Builder) -> None:
    params: dict[str, Any] = {}
    carried: dict[str, str] = {}
    if node.text("mode", "Parser") == "Stringify":
        params["mode"] = "stringify"
        carried["mode"] = "mode"
        b.ignore(node, "pattern", "not used in Stringify mode")
    else:
        params["template"] = node.text("pattern") or "{text}"
        carried["template"] = "pattern"
    sep = unescape(node.text("sep", "\n"))
    if sep != "\n":
        params["sep"] = sep
        carried["sep"] = "sep"
    if b.fed(node, "pattern") or b.fed(node, "sep"):
        b.problem(node.path, f"{node.label}: a pattern or separator fed by an edge is not "
                             "supported; write it in the node")
    fid = b.add(node, "Parser", params, carried=carried)
    if "mode" not in params:
        b.carry(node, "mode", node=fid, param="mode", note="template (the default)")
    b.input(node, "input_data", Target(fid, "data"))
    outputs_to(node, b, fid)


def split_text(node: LfNode, b: Builder) -> None:
    params: dict[str, Any] = {}
    carried: dict[str, str] = {}
    for field in ("chunk_size", "chunk_overlap"):
        value = node.number(field)
        if value is not None:
            params[field] = int(value)
            carried[field] = field
    separator = unescape(node.text("separator"))
    if separator:
        params["separators"] = [separator]
        carried["separators"] = "separator"
    fid = b.add(node, "TextSplitter", params, carried=carried)
    b.input(node, "data_inputs", Target(fid, "text"))
    outputs_to(node, b, fid)
    b.ignore(node, "keep_separator", "Flowgate's splitter keeps separators at chunk ends")
    b.ignore(node, "text_key", "Flowgate splits the input's text")


# -- memory and knowledge ------------------------------------------------------------------------


def memory(node: LfNode, b: Builder) -> None:
    """Message History (``Memory``): its Retrieve mode is a ChatHistory."""
    if node.text("mode", "Retrieve") == "Store":
        if b.outgoing.get(node.id):
            b.unsupported(node, "Message History in Store mode: Flowgate stores each turn of a "
                                "flow that has a ChatHistory node itself; remove this node")
        else:
            b.drop(node, "Message History in Store mode: Flowgate stores each turn of a flow "
                         "that has a ChatHistory node itself")
        return
    limit = clamp(node.number("n_messages"), 1, 200, 100)
    fid = b.add(node, "ChatHistory", {"max_messages": limit, "empty_text": ""},
                carried={"max_messages": "n_messages"})
    outputs_to(node, b, fid)
    b.ignore(node, "template", "Flowgate writes each turn as 'Human: …' or 'AI: …'")
    for name in ("order", "sender", "sender_type", "sender_name", "session_id", "context_id"):
        b.ignore(node, name, "Flowgate reads the run's session, oldest turn first")


def knowledge(node: LfNode, b: Builder) -> None:
    as_tool = feeds_tools(node, b)
    wanted = "KnowledgeSearchTool" if as_tool else "KnowledgeRetriever"
    if wanted not in b.registry:
        b.unsupported(node, "knowledge bases are not available on this engine (no "
                            f"{wanted} node type); upgrade the engine, or use a BM25Retriever "
                            "with the documents in params")
        return
    if node.text("mode", "Retrieve") != "Retrieve":
        b.unsupported(node, "Knowledge in Ingest mode: add documents to a knowledge base with "
                            "`flowgate knowledge` (or its API), and search it from the flow")
        return
    base = node.text("knowledge_base").strip()
    if not base:  # LangFlow's starter flows leave the dropdown empty
        b.problem(node.field_path("knowledge_base"), f"Knowledge {node.label} has no knowledge "
                  "base chosen: pick a Flowgate knowledge base (GET /api/v1/knowledge, or "
                  "`flowgate knowledge list`) and write its id or name in this field")
        b.drop(node, "no knowledge base is chosen", status="invalid")
        return
    params: dict[str, Any] = {"knowledge_id": base}
    carried = {"knowledge_id": "knowledge_base"}
    top_k = clamp(node.number("top_k"), 1, 100)
    if top_k is not None:
        params["k"] = top_k
        carried["k"] = "top_k"
    if as_tool:
        params.update(tool_meta(node))
    fid = b.add(node, wanted, params, carried=carried)
    if as_tool:
        b.output(node, "component_as_tool", fid)
    else:
        b.input(node, "search_query", Target(fid, "query"))
    for name in node.output_names():
        if name != "dataframe_output":  # the base's description, not search results
            b.output(node, name, fid)
    for name in ("include_metadata", "include_embeddings", "metadata_filter", "column_config",
                 "chunk_size", "allow_duplicates", "metadata_json"):
        b.ignore(node, name, "Flowgate's knowledge search returns chunks with their metadata")


def calculator(node: LfNode, b: Builder) -> None:
    if b.fed(node, "expression") or any(e.output != "component_as_tool"
                                        for e in b.outgoing.get(node.id, [])):
        b.unsupported(node, "Flowgate's Calculator is a tool for an Agent: connect its Toolset "
                            "output to an Agent's tools, or compute the value in your app")
        return
    fid = b.add(node, "Calculator", tool_meta(node))
    b.output(node, "component_as_tool", fid)
    if tool_meta(node):
        b.carry(node, "tools_metadata", node=fid, note="the tool's name and description")
    b.ignore(node, "expression", "the model writes the expression when it calls the tool")


def run_flow(node: LfNode, b: Builder) -> None:
    """Run Flow (as an Agent's tool) → FlowTool: the flow named there, by id or name."""
    if not feeds_tools(node, b) or any(e.output != "component_as_tool"
                                       for e in b.outgoing.get(node.id, [])):
        b.unsupported(node, "Run Flow is supported as an Agent's tool (it becomes a FlowTool); "
                            "to chain flows otherwise, call them one after the other from your app")
        return
    flow_ref = node.text("flow_name_selected").strip() or node.text("flow_id_selected").strip()
    field = "flow_name_selected" if node.text("flow_name_selected").strip() else "flow_id_selected"
    meta = tool_meta(node)
    params = {"flow_id": flow_ref, "description": meta.get("description") or (
        f"Runs the flow '{flow_ref}' with your message as its input."), **(
        {"name": meta["name"]} if "name" in meta else {})}
    fid = b.add(node, "FlowTool", params, carried={"flow_id": field})
    b.output(node, "component_as_tool", fid)
    for name in ("session_id", "cache_flow"):
        b.ignore(node, name, "the flow runs in the calling run's session, on its live version")


# -- what has no equivalent -------------------------------------------------------------------

_WEB = ("Flowgate flows make no web requests; fetch the content in your app and send it as the "
        "input, or put it in a flow your Agent calls with a FlowTool")
_STORE = ("use a Flowgate knowledge base (a Knowledge node becomes a KnowledgeRetriever) or a "
          "BM25Retriever with the documents in its params")
_CODE = "Flowgate never runs code from a flow; do this in your app"
HINTS = {
    "URLComponent": _WEB, "UnifiedWebSearch": _WEB, "WebSearchComponent": _WEB,
    "SearchAPI": _WEB, "TavilySearchComponent": _WEB, "APIRequest": _WEB, "RSSReaderSimple": _WEB,
    "File": ("upload the file to a knowledge base (`flowgate knowledge`) and search it with a "
             "Knowledge node"),
    "AstraDB": _STORE, "Chroma": _STORE, "FAISS": _STORE, "pgvector": _STORE, "Pinecone": _STORE,
    "Qdrant": _STORE, "Milvus": _STORE,
    "StructuredOutput": ("ask for JSON in the prompt and put a JsonOutputParser after the "
                         "ChatModel (a Parser then formats it)"),
    "SQLComponent": "query the database in your app and send the rows as the input",
    "PythonREPLComponent": _CODE, "PythonFunction": _CODE, "CustomComponent": (
        "a custom component: Flowgate runs only its whitelisted node types, never the code "
        "in an export"),
    "LoopComponent": "flows are acyclic: loop in your app, or let an Agent call a FlowTool",
    "BatchRunComponent": "run the flow once per item from your app",
    "SaveToFile": "flows write no files; save the flow's output in your app",
}


def what_to_do(node: LfNode, supported: list[str]) -> str:
    hint = HINTS.get(node.type)
    if hint is None:
        hint = (f"remove it, or replace it with a supported component ({', '.join(supported)})")
        if node.has_code:
            hint += "; its code was not run"
    return hint


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)

