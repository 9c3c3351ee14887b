"""Prompt templates: f-string syntax with plain field names only (see flows/templates.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from langchain_core.prompts import ChatPromptTemplate as LCChatPromptTemplate
from langchain_core.prompts import PromptTemplate as LCPromptTemplate
from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, Limits, Port
from flow_engine.flows.templates import template_fields


def _template_problems(name: str, template: Any, limits: Limits) -> Iterable[tuple[str, str]]:
    if not isinstance(template, str):
        return
    if len(template) > limits.max_template_chars:
        yield f".{name}", (
            f"template is {len(template)} characters; the limit is {limits.max_template_chars}"
        )
    for problem in template_fields(template)[1]:
        yield f".{name}", problem


def _ports(*templates: Any) -> tuple[Port, ...]:
    names: list[str] = []
    for template in templates:
        if isinstance(template, str):
            for field in template_fields(template)[0]:
                if field not in names:
                    names.append(field)
    return tuple(Port(n, coerce="text", description="template variable") for n in names)


_TEMPLATE = {"type": "string", "minLength": 1}


class PromptTemplate(Component):
    type_name = "PromptTemplate"
    display_name = "Prompt Template"
    description = "Fills an f-string template; each {field} is an input fed by an edge."
    outputs = ("prompt",)
    takes_mapping = True
    params_schema = {
        "type": "object",
        "properties": {"template": _TEMPLATE},
        "required": ["template"],
    }

    def inputs(self, params: Mapping[str, Any]) -> tuple[Port, ...]:
        return _ports(params.get("template"))

    def check_semantics(self, params, limits):
        yield from _template_problems("template", params.get("template"), limits)

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        return LCPromptTemplate.from_template(params["template"], template_format="f-string")


class ChatPromptTemplate(Component):
    type_name = "ChatPromptTemplate"
    display_name = "Chat Prompt Template"
    description = "A system and a human message template; fields of both are inputs."
    outputs = ("prompt",)
    takes_mapping = True
    params_schema = {
        "type": "object",
        "properties": {"system": {"type": "string", "default": ""}, "human": _TEMPLATE},
        "required": ["human"],
    }

    def inputs(self, params: Mapping[str, Any]) -> tuple[Port, ...]:
        return _ports(params.get("system"), params.get("human"))

    def check_semantics(self, params, limits):
        yield from _template_problems("system", params.get("system"), limits)
        yield from _template_problems("human", params.get("human"), limits)

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        messages = []
        if params.get("system"):
            messages.append(("system", params["system"]))
        messages.append(("human", params["human"]))
        return LCChatPromptTemplate.from_messages(messages, template_format="f-string")
