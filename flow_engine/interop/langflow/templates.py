"""LangFlow prompt templates as Flowgate templates.

LangFlow's Prompt has two syntaxes: f-string ``{name}`` (``{{`` is a literal brace), the
same as Flowgate's, and, with ``use_double_brackets``, mustache ``{{name}}`` (single braces
are literal). Both become Flowgate's f-string syntax with plain names only (flows/templates.py).
Mustache sections, partials, comments and triple braces (``{{#x}}``, ``{{> x}}``,
``{{! x}}``, ``{{{x}}}``) and dotted names have no equivalent and are reported.

A variable that no edge feeds is written into the template as text (its value in the
export, or empty, as LangFlow would fill it), so that the Flowgate node's inputs are exactly
the connected variables.
"""

from __future__ import annotations

import re
import string

from flow_engine.flows.templates import template_fields

_MUSTACHE_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_FORMATTER = string.Formatter()


def escape(text: str) -> str:
    """``text`` as a literal in an f-string template."""
    return text.replace("{", "{{").replace("}", "}}")


def variables(template: str, mustache: bool) -> tuple[list[str], list[str]]:
    """``(variable names in order, problems)`` of a LangFlow template."""
    if mustache:
        names: list[str] = []
        for match in _MUSTACHE_VAR.finditer(template):
            if match.group(1) not in names:
                names.append(match.group(1))
        rest = _MUSTACHE_VAR.sub("", template)
        if "{{" in rest or "}}" in rest:
            return names, ["mustache sections, partials, comments, triple braces and dotted "
                           "names ({{#x}}, {{> x}}, {{! x}}, {{{x}}}, {{a.b}}) have no Flowgate "
                           "equivalent; use plain {{name}} variables only"]
        return names, []
    return template_fields(template)


def to_flowgate(template: str, mustache: bool, static: dict[str, str]) -> tuple[str, list[str]]:
    """``(Flowgate template, problems)``: variables in ``static`` are written in as text."""
    problems = variables(template, mustache)[1]
    if problems:
        return "", problems
    out: list[str] = []
    if mustache:
        last = 0
        for match in _MUSTACHE_VAR.finditer(template):
            out.append(escape(template[last:match.start()]))
            out.append(_field(match.group(1), static))
            last = match.end()
        out.append(escape(template[last:]))
    else:
        for literal, name, _spec, _conversion in _FORMATTER.parse(template):
            out.append(escape(literal))
            if name is not None:
                out.append(_field(name, static))
    return "".join(out), []


def _field(name: str, static: dict[str, str]) -> str:
    return escape(static[name]) if name in static else "{" + name + "}"
