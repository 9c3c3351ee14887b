"""ConditionalRouter: sends its input down the ``true`` or the ``false`` output.

Nodes reachable only through the branch not taken are skipped for that run. Patterns are
matched against at most ``max_chars`` characters of input; a repeat inside a repeat (``(a+)+``,
``((a*))*``, ``(a{2,}b?)+``) is rejected because Python's ``re`` cannot bound the catastrophic
backtracking such patterns allow.
"""

from __future__ import annotations

import re
from typing import Any

from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, NodeFunction, Port, Routed


def has_nested_repeat(pattern: str) -> bool:
    """True when a variable-length repeat contains another one, found on the parsed regex
    (not by text matching, which extra groups or escapes would fool)."""
    from re import _constants as c
    from re import _parser

    repeats = {c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT}

    def walk(items, inside: bool) -> bool:
        for op, arg in items:
            if op in repeats:
                low, high, sub = arg
                variable = high != low
                if variable and inside:
                    return True
                if walk(sub, inside or variable):
                    return True
            elif op in (c.SUBPATTERN, c.ATOMIC_GROUP) or op is c.ASSERT or op is c.ASSERT_NOT:
                sub = arg[-1]
                if walk(sub, inside):
                    return True
            elif op is c.BRANCH:
                if any(walk(branch, inside) for branch in arg[1]):
                    return True
            elif op is c.GROUPREF_EXISTS:
                if any(b is not None and walk(b, inside) for b in arg[1:]):
                    return True
        return False

    return walk(_parser.parse(pattern).data, False)


class ConditionalRouter(Component):
    type_name = "ConditionalRouter"
    display_name = "Conditional Router"
    description = "Routes its input to 'true' or 'false' by a contains/equals/starts_with/regex test."
    outputs = ("true", "false")
    input_ports = (Port("input", coerce="text"),)
    params_schema = {
        "type": "object",
        "properties": {
            "operator": {"enum": ["contains", "equals", "starts_with", "regex"],
                         "default": "contains"},
            "pattern": {"type": "string", "minLength": 1, "maxLength": 500},
            "case_sensitive": {"type": "boolean", "default": False},
            "max_chars": {"type": "integer", "minimum": 1, "maximum": 1_000_000,
                          "default": 10_000},
        },
        "required": ["pattern"],
    }

    def check_semantics(self, params, limits):
        pattern = params.get("pattern")
        if params.get("operator") != "regex" or not isinstance(pattern, str):
            return
        try:
            re.compile(pattern)
        except re.error as exc:
            yield ".pattern", f"invalid regular expression: {exc}"
            return
        if has_nested_repeat(pattern):
            yield ".pattern", (
                "nested quantifiers like (a+)+ can take exponential time; rewrite the pattern"
            )

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        test = _matcher(params)
        limit = params["max_chars"]

        def route(text: str) -> Routed:
            return Routed("true" if test(text[:limit]) else "false", text)

        return NodeFunction(route, name=node_id)


def _matcher(params: dict[str, Any]):
    operator, pattern = params["operator"], params["pattern"]
    if operator == "regex":
        compiled = re.compile(pattern, 0 if params["case_sensitive"] else re.IGNORECASE)
        return lambda text: compiled.search(text) is not None
    fold = (lambda s: s) if params["case_sensitive"] else str.casefold
    needle = fold(pattern)
    if operator == "equals":
        return lambda text: fold(text.strip()) == needle
    if operator == "starts_with":
        return lambda text: fold(text).startswith(needle)
    return lambda text: needle in fold(text)
