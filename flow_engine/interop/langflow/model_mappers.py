"""LangFlow models and agents → Flowgate: LanguageModelComponent and OpenAIModel become a
ChatModel (provider ``openai``), Agent an Agent with its tools, MemoryBase the agent's
ChatHistory.

A system message becomes a **ChatPromptTemplate** in front of the ChatModel (its ``system``
and ``human`` templates), not a ChatModel param: Flowgate's ChatModel takes one prompt, and
a ChatPromptTemplate is how a Flowgate flow says "this system message, then this user
message" — so an imported flow reads like a hand-written one, and a system message fed by
an edge (LangFlow's Basic Prompting feeds it from a Prompt) is just another template field.

Keys are never imported (the engine's ``OPENAI_API_KEY`` is used); a provider other than
OpenAI is called through the engine's OpenAI-compatible endpoint, with a warning.
"""

from __future__ import annotations

from typing import Any

from flow_engine.interop.langflow.builder import Builder, Target
from flow_engine.interop.langflow.mappers import clamp, outputs_to
from flow_engine.interop.langflow.reader import LfEdge, LfNode
from flow_engine.interop.langflow.templates import escape

MODEL_TYPES = ("LanguageModelComponent", "OpenAIModel")
_IGNORED_MODEL_FIELDS = {
    "stream": "Flowgate always streams from OpenAI-compatible endpoints",
    "seed": "not carried", "json_mode": "not carried; use a JsonOutputParser",
    "model_kwargs": "not carried (extra request fields could carry anything)",
    "base_url_ibm_watsonx": "another provider's setting", "project_id": "another provider's setting",
    "ollama_base_url": "another provider's setting", "output_parser": "not carried",
}


def model_params(node: LfNode, b: Builder) -> tuple[dict[str, Any], dict[str, str]]:
    """ChatModel params from a LangFlow model (or an Agent's own model fields)."""
    params: dict[str, Any] = {"provider": "openai"}
    carried: dict[str, str] = {}
    name, provider, source = _model_choice(node)
    if name:
        params["model"] = name[:200]
        carried["model"] = source
    else:
        b.warn(node, "model_default", f"{node.label} names no model; Flowgate's default "
                                      "(gpt-4o-mini) was used")
    if provider and provider.lower().replace(" ", "") not in ("openai", "azureopenai"):
        b.warn(node, "provider_changed",
               f"{node.label} used provider '{provider[:60]}'; Flowgate calls the engine's "
               "OpenAI-compatible endpoint (OPENAI_BASE_URL), which must serve this model "
               "(a gateway such as LiteLLM can front other providers)")
    temperature = node.number("temperature")
    if temperature is not None:
        params["temperature"] = max(0.0, min(2.0, float(temperature)))
        carried["temperature"] = "temperature"
    max_tokens = node.number("max_tokens")
    if max_tokens is not None and max_tokens > 0:  # 0: no limit
        params["max_tokens"] = int(max_tokens)
        carried["max_tokens"] = "max_tokens"
    base_url = node.text("openai_api_base").strip()
    if base_url:
        params["base_url"] = base_url
        carried["base_url"] = "openai_api_base"
    timeout = node.number("timeout")
    if timeout is not None and timeout > 0:
        params["timeout"] = min(float(timeout), 3600.0)
        carried["timeout"] = "timeout"
    retries = clamp(node.number("max_retries"), 0, 5)
    if retries is not None:
        params["max_retries"] = retries
        carried["max_retries"] = "max_retries"
    for field_name, reason in _IGNORED_MODEL_FIELDS.items():
        b.ignore(node, field_name, reason)
    return params, carried


def _model_choice(node: LfNode) -> tuple[str, str, str]:
    """``(model name, provider, field)``: the ``model`` selection, or the older fields."""
    name, provider, source = "", "", "model"
    chosen = node.value("model")
    if isinstance(chosen, list) and chosen:
        chosen = chosen[0]
    if isinstance(chosen, dict):
        name = chosen.get("name") if isinstance(chosen.get("name"), str) else ""
        provider = chosen.get("provider") if isinstance(chosen.get("provider"), str) else ""
    elif isinstance(chosen, str) and chosen != "connect_other_models":
        name = chosen
    override = node.text("model_name").strip()
    if override:
        name, source = override, "model_name"
    provider = node.text("provider").strip() or node.text("agent_llm").strip() or provider
    if node.type == "OpenAIModel":
        provider = provider or "OpenAI"
    return name.strip(), provider, source


def language_model(node: LfNode, b: Builder) -> None:
    out = b.outgoing.get(node.id, [])
    as_model = [e for e in out if e.output == "model_output"]
    for edge in as_model:
        target = b.by_id.get(edge.target)
        if target is None or target.type != "Agent" or edge.field not in ("model", "agent_llm"):
            b.problem(edge.path, f"the model of {node.label} goes to field '{edge.field}' of "
                                 f"'{edge.target}'; only an Agent's model may be a connected model")
    if as_model and len(as_model) == len(out) and not (
            b.fed(node, "input_value") or b.fed(node, "system_message")):
        agents = ", ".join(sorted({e.target for e in as_model}))
        b.drop(node, f"merged: its settings are the model of Agent {agents}", status="merged")
        return
    params, carried = model_params(node, b)
    llm = b.add(node, "ChatModel", params, carried=carried)
    _prompt_for(node, b, llm)
    b.output(node, "text_output", llm)


def _prompt_for(node: LfNode, b: Builder, llm: str) -> None:
    """What feeds the ChatModel: a ChatPromptTemplate when there is a system message."""
    system, system_fed = node.text("system_message"), bool(b.fed(node, "system_message"))
    text, input_fed = node.text("input_value"), bool(b.fed(node, "input_value"))
    if system or system_fed:
        params = {"system": "{system_message}" if system_fed else escape(system),
                  "human": "{input_value}" if input_fed else escape(text)}
        prompt = b.add(node, "ChatPromptTemplate", params, suffix="prompt",
                       carried={"system": "system_message", "human": "input_value"},
                       added="holds the system message and the user's message (Flowgate's "
                             "ChatModel takes one prompt)")
        if system_fed:
            b.input(node, "system_message", Target(prompt, "system_message"))
        if input_fed:
            b.input(node, "input_value", Target(prompt, "input_value"))
        b.link(prompt, llm, None, node.path)
    elif input_fed:
        b.input(node, "input_value", Target(llm, "prompt"))
    elif text:
        fixed = b.add(node, "PromptTemplate", {"template": escape(text)}, suffix="input",
                      carried={"template": "input_value"},
                      added="the input text written in the node")
        b.link(fixed, llm, None, node.path)


def agent(node: LfNode, b: Builder) -> None:
    model_edges = b.fed(node, "model") + b.fed(node, "agent_llm")
    source = b.by_id.get(model_edges[0].source) if model_edges else None
    if source is not None and source.type in MODEL_TYPES:
        params, _ = model_params(source, b)
        carried: dict[str, str] = {}
        b.carry(node, "model", note=f"the settings of the connected model {source.id}")
    else:
        params, carried = model_params(node, b)
    system, system_fed = node.text("system_prompt"), bool(b.fed(node, "system_prompt"))
    if system and not system_fed:
        params["system_prompt"] = system
        carried["system_prompt"] = "system_prompt"
    iterations = clamp(node.number("max_iterations"), 1, 50)
    if iterations is not None:
        params["max_iterations"] = iterations
        carried["max_iterations"] = "max_iterations"
    params["tools"] = []
    fid = b.add(node, "Agent", params, carried=carried)
    if system_fed:
        b.input(node, "system_prompt", Target(fid, "system_prompt"))
    _agent_input(node, b, fid)
    b.input(node, "tools", lambda edge: _tool_slot(b, fid, edge))
    _agent_memory(node, b, fid)
    if node.flag("add_calculator_tool"):
        calc = b.add(node, "Calculator", {}, suffix="calculator", added="add_calculator_tool")
        b.link(calc, fid, f"tools.{b.slot(fid, 'calculator')}", node.path)
        b.carry(node, "add_calculator_tool", node=calc, note="a Calculator tool")
    if node.flag("add_current_date_tool"):
        b.warn(node, "tool_dropped", f"{node.label} had add_current_date_tool; Flowgate has no "
                                     "date tool (put the date in the input if the model needs it)")
    b.output(node, "response", fid)
    for name in ("handle_parsing_errors", "verbose", "format_instructions", "output_schema",
                 "context_id", "agent_description"):
        b.ignore(node, name, "not carried")


def _agent_input(node: LfNode, b: Builder, fid: str) -> None:
    text = node.text("input_value")
    if b.fed(node, "input_value"):
        b.input(node, "input_value", Target(fid, "input"))
    elif text:
        fixed = b.add(node, "PromptTemplate", {"template": escape(text)}, suffix="input",
                      carried={"template": "input_value"}, added="the input text written in the node")
        b.link(fixed, fid, "input", node.path)


def _agent_memory(node: LfNode, b: Builder, fid: str) -> None:
    """LangFlow's Agent reads the session's last ``n_messages`` by itself (unless a memory
    tool stands in); here a ChatHistory node feeds its ``history`` input."""
    if any(b.by_id.get(e.source) and b.by_id[e.source].type == "MemoryBase"
           for e in b.fed(node, "tools")):
        b.ignore(node, "n_messages", "a MemoryBase tool gives this agent its history")
        return
    if b.fed(node, "memory"):
        b.problem(node.path, f"{node.label}: an external memory connected to an Agent is not "
                             "supported; Flowgate's ChatHistory reads the run's session")
        return
    limit = clamp(node.number("n_messages"), 0, 200)
    if not limit:
        return
    history = b.add(node, "ChatHistory", {"max_messages": limit, "empty_text": ""},
                    suffix="history", carried={"max_messages": "n_messages"},
                    added="LangFlow's Agent reads the session's last n_messages itself")
    b.link(history, fid, "history", node.path)


def _tool_slot(b: Builder, fid: str, edge: LfEdge) -> Target | None:
    source = b.by_id.get(edge.source)
    if source is not None and source.type == "MemoryBase":
        return Target(fid, "history")
    made = b.outputs.get((edge.source, edge.output))
    if made is None:
        return None
    return Target(fid, f"tools.{b.slot(fid, made.node)}")


def memory_base(node: LfNode, b: Builder) -> None:
    """MemoryBase (a tool searching past messages) → the agent's ChatHistory."""
    out = b.outgoing.get(node.id, [])
    to_agents = [e for e in out if e.field == "tools" and b.by_id.get(e.target)
                 and b.by_id[e.target].type == "Agent"]
    if not out or len(to_agents) != len(out):
        b.unsupported(node, "Memory Base is supported as an Agent's tool only: connect it to "
                            "an Agent's tools (it becomes the agent's ChatHistory)")
        return
    limit = clamp(node.number("top_k"), 1, 200, 5)
    fid = b.add(node, "ChatHistory", {"max_messages": limit, "empty_text": ""},
                carried={"max_messages": "top_k"})
    outputs_to(node, b, fid)
    b.warn(node, "memory_changed", f"{node.label} searched past messages by meaning; as "
                                   f"Flowgate's ChatHistory it gives the agent the session's "
                                   f"last {limit} messages instead")
    for name in ("search_query", "memory_base", "filter_by_session", "include_metadata",
                 "tools_metadata"):
        b.ignore(node, name, "the agent gets the session's last messages, not a search")
