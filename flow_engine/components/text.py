"""TextSplitter: recursive character splitting (langchain-text-splitters)."""

from __future__ import annotations

from typing import Any

from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, NodeFunction, Port


class TextSplitter(Component):
    type_name = "TextSplitter"
    display_name = "Text Splitter"
    description = "Splits text into overlapping chunks, trying paragraph, line, then word breaks."
    outputs = ("chunks",)
    input_ports = (Port("text", coerce="text"),)
    params_schema = {
        "type": "object",
        "properties": {
            "chunk_size": {"type": "integer", "minimum": 1, "maximum": 100_000, "default": 1000},
            "chunk_overlap": {"type": "integer", "minimum": 0, "maximum": 100_000, "default": 200},
            "separators": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
        },
    }

    def check_semantics(self, params, limits):
        size = self.with_defaults(params).get("chunk_size")
        overlap = self.with_defaults(params).get("chunk_overlap")
        if isinstance(size, int) and isinstance(overlap, int) and overlap >= size:
            yield ".chunk_overlap", (
                f"chunk_overlap ({overlap}) must be smaller than chunk_size ({size})"
            )

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        options = {"chunk_size": params["chunk_size"], "chunk_overlap": params["chunk_overlap"]}
        if params.get("separators"):
            options["separators"] = params["separators"]
        splitter = RecursiveCharacterTextSplitter(**options)
        return NodeFunction(splitter.split_text, name=node_id)
