"""ChatHistory: the earlier turns of this session's conversation with this flow.

It reads up to ``max_messages`` messages for the run's tenant and ``session_id`` from the engine's
store (given to components as ``BuildContext.extra["chat_memory"]``) and outputs them as
text (``Human: ...`` / ``AI: ...`` lines) for a prompt field such as ``{history}``. After a
successful run the engine appends the user's input and the flow's output to the session, so
the next run sees them. Without a ``session_id`` the history is empty and nothing is kept.
"""

from __future__ import annotations

from typing import Any, Protocol

from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, NodeFunction

_LABEL = {"human": "Human", "ai": "AI"}


class ChatMemory(Protocol):
    def chat_history(self, tenant: str, session_id: str, flow_id: str,
                     limit: int) -> list[Any]: ...


class ChatHistory(Component):
    type_name = "ChatHistory"
    display_name = "Chat History"
    description = "Earlier messages of this session (needs session_id in the run request)."
    reads_run_input = True
    outputs = ("history",)
    params_schema = {
        "type": "object",
        "properties": {
            "max_messages": {"type": "integer", "minimum": 1, "maximum": 200, "default": 20},
            "empty_text": {"type": "string", "maxLength": 1000, "default": "(no earlier messages)"},
        },
    }

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        memory: ChatMemory | None = ctx.extra.get("chat_memory")
        limit, empty = params["max_messages"], params["empty_text"]

        def read_history(run_input: dict[str, Any]) -> str:
            session, flow_id = run_input.get("session_id"), run_input.get("flow_id")
            tenant = run_input.get("tenant")
            if memory is None or not session or not flow_id or not tenant:
                return empty
            messages = memory.chat_history(tenant, session, flow_id, limit)
            if not messages:
                return empty
            return "\n".join(f"{_LABEL.get(m.role, m.role)}: {m.content}" for m in messages)

        return NodeFunction(read_history, name=node_id)
