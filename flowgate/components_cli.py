"""``flowgate components [TYPE]``: the node types a flow may use, and one type's params,
inputs and outputs — from the engine (``GET /api/v1/components``) or, with ``--offline``,
from this installation's registry (the same code, so the same answer for the same version).

    flowgate components                  every type: name, kind, what it does
    flowgate components ChatModel        its params (type, default, limits), inputs, outputs
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any


def add_command(sub) -> None:
    comp = sub.add_parser("components", help="list node types, or show one type's params")
    comp.add_argument("type", nargs="?", help="a node type, e.g. ChatModel")
    comp.add_argument("--offline", action="store_true",
                      help="read this installation's registry instead of asking the engine")
    comp.add_argument("--engine-url", default=None, help="default: FLOWGATE_ENGINE_URL or :8000")
    comp.add_argument("--api-key", default=None, help="default: FLOWGATE_API_KEY, ...")
    comp.set_defaults(handler=_components)


def _components(args: argparse.Namespace) -> int:
    if args.offline:
        from flow_engine.components import default_registry

        described = [c.describe() for c in default_registry()]
    else:
        from flowgate.flows_cli import _client

        described = _client(args).call("GET", "/components")["components"]
    if args.type is None:
        width = max(len(c["type"]) for c in described)
        for c in described:
            print(f"{c['type']:<{width}}  {c['kind']:<6}  {c['description']}")
        return 0
    found = [c for c in described if c["type"] == args.type]
    if not found:
        hint = difflib.get_close_matches(args.type, [c["type"] for c in described], n=1)
        print(f"flowgate: no node type '{args.type}'"
              + (f"; did you mean '{hint[0]}'?" if hint else "")
              + " (flowgate components lists them)", file=sys.stderr)
        return 1
    _show(found[0])
    return 0


def _show(c: dict[str, Any]) -> None:
    print(f"{c['type']} ({c['kind']}): {c['description']}")
    props = c["params_schema"].get("properties", {})
    required = set(c["params_schema"].get("required", []))
    print("params:" if props else "params: none")
    for name, spec in props.items():
        facts = [_kind(spec)]
        if name in required:
            facts.append("required")
        if "default" in spec:
            facts.append(f"default {spec['default']!r}")
        for key, word in (("minimum", ">="), ("maximum", "<="), ("exclusiveMinimum", ">"),
                          ("maxLength", "max length"), ("maxItems", "max items")):
            if key in spec:
                facts.append(f"{word} {spec[key]}")
        line = f"  {name}: {', '.join(facts)}"
        if spec.get("description"):
            line += f" — {spec['description']}"
        print(line)
    inputs = ", ".join(f"{i['name']}{'' if i['required'] else ' (optional)'}" for i in c["inputs"])
    print(f"inputs:  {inputs or 'none fixed (input nodes read the run; templates take their {fields})'}")
    print(f"outputs: {', '.join(c['outputs']) or 'none'}")


def _kind(spec: dict[str, Any]) -> str:
    if "enum" in spec:
        return "one of " + ", ".join(map(str, spec["enum"]))
    if "type" in spec:
        return str(spec["type"])
    if "oneOf" in spec:
        return " or ".join(_kind(s) for s in spec["oneOf"])
    return "any"
