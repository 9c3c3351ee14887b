"""Output parsers: a model message → text (StrOutputParser) or JSON (JsonOutputParser)."""

from __future__ import annotations

from typing import Any

from langchain_core.output_parsers import JsonOutputParser as LCJsonOutputParser
from langchain_core.output_parsers import StrOutputParser as LCStrOutputParser
from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, Port


class StrOutputParser(Component):
    type_name = "StrOutputParser"
    display_name = "String Output Parser"
    description = "A model message as plain text."
    outputs = ("text",)
    input_ports = (Port("message", coerce="any"),)

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        return LCStrOutputParser()


class JsonOutputParser(Component):
    type_name = "JsonOutputParser"
    display_name = "JSON Output Parser"
    description = "Parses the model's answer as JSON (```json fences allowed)."
    outputs = ("data",)
    input_ports = (Port("message", coerce="any"),)

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        return LCJsonOutputParser()
