"""ConditionalRouter: sends its input down the ``true`` or the ``false`` output.

Nodes reachable only through the branch not taken are skipped for that run. Patterns are
matched against at most ``max_chars`` characters of input by RE2 (``google-re2``), whose
matching time is linear in the input whatever the pattern: ``(a|a)+$`` against a long
input takes microseconds, where Python's backtracking ``re`` takes longer than the age of
the universe and blocks the whole worker meanwhile. Pattern syntax is RE2's (Python's
without backreferences and lookaround; ``\\d`` and ``\\w`` are ASCII); a pattern RE2 cannot
compile is a validation problem.
"""

from __future__ import annotations

from typing import Any

import re2
from langchain_core.runnables import Runnable

from flow_engine.components.base import BuildContext, Component, NodeFunction, Port, Routed

MAX_PROGRAM_SIZE = 5000  # RE2 instructions; at 100,000 characters of input a search stays
# in the tens of milliseconds (a 95,000-instruction program took 30 s: its DFA does not fit)
MAX_CHARS = 100_000


def compile_pattern(pattern: str, case_sensitive: bool):
    """An RE2 pattern; ``re2.error`` with RE2's reason when it cannot compile."""
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False  # a bad pattern is the caller's problem, not a log line
    options.max_mem = 8 << 20  # bounds the compiled program (patterns are ≤ 500 chars)
    return re2.compile(pattern, options)


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
            "max_chars": {"type": "integer", "minimum": 1, "maximum": MAX_CHARS,
                          "default": 10_000},
        },
        "required": ["pattern"],
    }

    def check_semantics(self, params, limits):
        pattern = params.get("pattern")
        if params.get("operator") != "regex" or not isinstance(pattern, str):
            return
        case_sensitive = params.get("case_sensitive", False)  # compiled as it will run
        try:
            compiled = compile_pattern(pattern, case_sensitive is True)
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(
                exc.args[0], bytes) else str(exc)
            yield ".pattern", (f"invalid regular expression for RE2: {reason} (backreferences "
                               "and lookaround are not supported)")
            return
        if compiled.programsize > MAX_PROGRAM_SIZE:
            yield ".pattern", (f"the pattern compiles to {compiled.programsize} RE2 instructions; "
                               f"the limit is {MAX_PROGRAM_SIZE} (large counted repetitions such "
                               "as (...){1000} cost the most: use + or a smaller count)")

    def build(self, node_id: str, params: dict[str, Any], ctx: BuildContext) -> Runnable:
        test = _matcher(params)
        limit = params["max_chars"]

        def route(text: str) -> Routed:
            return Routed("true" if test(text[:limit]) else "false", text)

        return NodeFunction(route, name=node_id)


def _matcher(params: dict[str, Any]):
    operator, pattern = params["operator"], params["pattern"]
    if operator == "regex":
        compiled = compile_pattern(pattern, params["case_sensitive"])
        return lambda text: compiled.search(text) is not None
    fold = (lambda s: s) if params["case_sensitive"] else str.casefold
    needle = fold(pattern)
    if operator == "equals":
        return lambda text: fold(text.strip()) == needle
    if operator == "starts_with":
        return lambda text: fold(text).startswith(needle)
    return lambda text: needle in fold(text)
