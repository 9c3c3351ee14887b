"""How values move between nodes: coercion to what an input port expects, and the JSON
form of a node's output used in run events and results."""

from __future__ import annotations

import json
import math
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import PromptValue

from flow_engine.components.base import Routed


def to_text(value: Any) -> str:
    """Plain text of any node output: documents are joined by blank lines."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, BaseMessage):
        return value.text
    if isinstance(value, PromptValue):
        return value.to_string()
    if isinstance(value, Document):
        return value.page_content
    if isinstance(value, Routed):
        return to_text(value.value)
    if isinstance(value, list | tuple):
        if all(isinstance(v, str | Document | BaseMessage | PromptValue) for v in value):
            return "\n\n".join(to_text(v) for v in value)  # chunks, documents, messages
        return json.dumps(value, ensure_ascii=False, default=str)  # parsed JSON stays JSON
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def to_prompt(value: Any) -> Any:
    """What a chat model accepts: text, a prompt value, or a list of messages."""
    if isinstance(value, str | PromptValue):
        return value
    if isinstance(value, list) and value and all(isinstance(v, BaseMessage) for v in value):
        return value
    if isinstance(value, BaseMessage):
        return [value]
    return to_text(value)


COERCE = {"text": to_text, "prompt": to_prompt, "any": lambda v: v}


def to_jsonable(value: Any) -> Any:
    """A JSON-serialisable view of a node output (for events, run records and results).
    NaN and the infinities (a model's JSON may hold them) become null: they are not JSON —
    a browser's JSON.parse and PostgreSQL's jsonb refuse them."""
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, BaseMessage):
        out: dict[str, Any] = {"type": value.type, "content": value.text}
        usage = getattr(value, "usage_metadata", None)
        if usage:
            out["usage"] = dict(usage)
        return out
    if isinstance(value, PromptValue):
        return value.to_string()
    if isinstance(value, Document):
        return {"page_content": value.page_content, "metadata": to_jsonable(value.metadata)}
    if isinstance(value, Routed):
        return {"branch": value.port, "value": to_jsonable(value.value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return str(value)
