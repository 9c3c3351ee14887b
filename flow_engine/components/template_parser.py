"""Parser: data → text by a template, LangFlow's Parser component in Flowgate.

Its input is whatever the node upstream gives — retrieved documents, a JSON object or list
from a JsonOutputParser, messages, plain text — seen as a list of rows, each row a mapping
of fields:

- a document: its metadata, plus ``text`` (the page content)
- an object: its keys (values that are not text are written as JSON)
- a message: ``text`` and ``sender``
- anything else: ``text``

``mode: template`` fills ``template`` once per row and joins the results with ``sep``;
``mode: stringify`` joins the items as text (a document's content, a message's text, an
object or list as JSON) with ``sep``. The template has the
prompt templates' syntax and rules (flows/templates.py: ``{field}``, ``{{`` for a brace,
plain names only), so a row's value is only ever substituted, never reached into; a field a
row does not have becomes empty text.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, Limits, NodeFunction, Port, Routed
from flow_engine.flows.templates import template_fields

_FORMATTER = string.Formatter()
MAX_ROWS = 10_000


class _Row(dict):
    def __missing__(self, key: str) -> str:
        return ""


class Parser(Component):
    type_name = "Parser"
    display_name = "Parser"
    description = ("Turns data (documents, JSON, messages) into text: a template filled "
                   "once per row, or the rows as text, joined by a separator.")
    outputs = ("text",)
    input_ports = (Port("data", coerce="any", description="documents, JSON, messages or text"),)
    params_schema = {
        "type": "object",
        "properties": {
            "mode": {"enum": ["template", "stringify"], "default": "template"},
            "template": {"type": "string", "minLength": 1, "default": "{text}",
                         "description": "filled per row; {field} names a field of the row"},
            "sep": {"type": "string", "maxLength": 100, "default": "\n"},
        },
    }

    def check_semantics(self, params: Mapping[str, Any], limits: Limits):
        template = params.get("template")
        if not isinstance(template, str):
            return
        if len(template) > limits.max_template_chars:
            yield ".template", (f"template is {len(template)} characters; the limit is "
                                f"{limits.max_template_chars}")
        for problem in template_fields(template)[1]:
            yield ".template", problem

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        template, sep = params["template"], params["sep"]
        stringify = params["mode"] == "stringify"

        def parse(value: Any) -> str:
            items = _items(value)[:MAX_ROWS]
            if stringify:
                return sep.join(_stringify(item) for item in items)
            return sep.join(_FORMATTER.vformat(template, (), _Row(_fields(item)))
                            for item in items)

        return NodeFunction(parse, name=node_id)


def _items(value: Any) -> list[Any]:
    if isinstance(value, Routed):
        value = value.value
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _fields(item: Any) -> dict[str, str]:
    if isinstance(item, Document):
        return {**{str(k): _text(v) for k, v in item.metadata.items()}, "text": item.page_content}
    if isinstance(item, BaseMessage):
        return {"text": item.text, "sender": item.type}
    if isinstance(item, dict):
        return {str(k): _text(v) for k, v in item.items()}
    return {"text": _text(item)}


def _stringify(item: Any) -> str:
    if isinstance(item, Document):
        return item.page_content
    if isinstance(item, BaseMessage):
        return item.text
    return _text(item)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return "" if value is None else str(value)
