"""Prompt templates are Python f-string *syntax* with plain names only.

``{question}`` is a field; ``{{`` and ``}}`` are literal braces. Anything that would make
``str.format`` reach into an object — attributes (``{x.__class__}``), indexes (``{x[0]}``),
positional fields (``{}``, ``{0}``), nested or any format specs (``{x:>999999999}`` would
allocate a gigabyte) — is rejected, so a template can only ever substitute text.
"""

from __future__ import annotations

import string

_FORMATTER = string.Formatter()


def template_fields(template: str) -> tuple[list[str], list[str]]:
    """Return ``(field names in order of first use, problems)`` for ``template``."""
    fields: list[str] = []
    problems: list[str] = []
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        return [], [f"template is not a valid f-string ({exc}); write {{{{ and }}}} for literal braces"]
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            problems.append(
                "positional field '{" + name + "}' is not allowed; name it, e.g. {question}"
            )
            continue
        if not name.isidentifier():
            problems.append(
                f"field '{{{name}}}' reaches into an attribute or index; only plain names such "
                "as {question} are allowed"
            )
            continue
        if spec:
            problems.append(
                f"field '{{{name}:{spec}}}' has a format spec; format specs are not allowed"
            )
        if conversion not in (None, "s"):
            problems.append(f"field '{{{name}!{conversion}}}' uses a conversion; only !s is allowed")
        if name not in fields:
            fields.append(name)
    return fields, problems
