"""Where a flow starts and ends: ChatInput, TextInput, ChatOutput, TextOutput."""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, NodeFunction, Port


class _InputComponent(Component):
    kind = "input"
    reads_run_input = True
    outputs = ("message",)
    accepts: tuple[str, ...] = ()  # run input_type values that feed this node

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        default = params.get("input_value", "")
        accepts = self.accepts

        def read_input(run_input: dict[str, Any]) -> str:
            if run_input.get("input_type", "chat") in accepts:
                value = run_input.get("input_value")
                if value is not None:
                    return value
            return default

        return NodeFunction(read_input, name=node_id)


class ChatInput(_InputComponent):
    type_name = "ChatInput"
    display_name = "Chat Input"
    description = "The user's message: the run's input_value when input_type is chat or any."
    accepts = ("chat", "any")
    params_schema = {
        "type": "object",
        "properties": {
            "input_value": {"type": "string", "default": "", "maxLength": 100_000,
                            "description": "used when the run gives no input_value"},
        },
    }


class TextInput(_InputComponent):
    type_name = "TextInput"
    display_name = "Text Input"
    description = (
        "A text value: the run's input_value when input_type is text or any, "
        "else its input_value param (set per run with tweaks)."
    )
    accepts = ("text", "any")
    params_schema = ChatInput.params_schema


class _OutputComponent(Component):
    kind = "output"
    outputs = ("message",)
    input_ports = (Port("message", coerce="text", description="what the flow answers"),)

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        return NodeFunction(_identity, name=node_id)


def _identity(value: Any) -> Any:
    return value


class ChatOutput(_OutputComponent):
    type_name = "ChatOutput"
    display_name = "Chat Output"
    description = "The flow's chat answer (as text)."


class TextOutput(_OutputComponent):
    type_name = "TextOutput"
    display_name = "Text Output"
    description = "A text result of the flow."
